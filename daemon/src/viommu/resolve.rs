//! vIOMMU model auto resolution (see below).
