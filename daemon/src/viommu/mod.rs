//! The embedded vIOMMU: the ATS contract every translation source answers ([`ats`]), the
//! shadow source that translates from the client's DMA map table ([`shadow`]), the resolution
//! of a vIOMMU model's `auto` properties from host IOMMU data ([`resolve`]), and the Intel
//! VT-d ([`vtd`]) and Arm SMMUv3 ([`smmuv3`]) models, each a pure model over guest memory
//! reached through a narrow trait, so they are tested without a VMM or a kernel.
//!
//! Every translation source answers the same [`ats::TranslationSource`] contract and raises the
//! same [`ats::AtcInvalidation`], so a device model never knows which one it talks to.

pub mod ats;
pub mod guest;
pub mod resolve;
pub mod shadow;
pub mod smmuv3;
pub mod vtd;
