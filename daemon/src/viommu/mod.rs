//! Embedded vIOMMU models.

pub mod vtd;
