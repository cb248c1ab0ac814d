//! The methods' math as pure functions over tensors.
pub mod guidance;
