//! Embedded vIOMMU models: Intel VT-d and Arm SMMUv3, each a pure model over guest memory
//! reached through a narrow trait, so they are tested without a VMM or a kernel.

pub mod smmuv3;
pub mod vtd;
