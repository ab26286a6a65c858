//! The vIOMMU side of ATS: the translation contract every translation source answers
//! ([`ats`]), the shadow source that translates from the client's DMA map table ([`shadow`]),
//! and the resolution of a vIOMMU model's `auto` properties from host IOMMU data ([`resolve`]).
//!
//! The embedded VT-d and SMMUv3 models answer the same [`ats::TranslationSource`] contract and
//! raise the same [`ats::AtcInvalidation`] as the shadow source does, so a device model never
//! knows which one it talks to.

pub mod ats;
pub mod resolve;
pub mod shadow;
