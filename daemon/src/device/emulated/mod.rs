//! Device models that live inside vfud.

pub mod atc;
pub mod ats_dma;

pub use ats_dma::AtsDma;
