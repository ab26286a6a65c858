pub mod smmuv3;
