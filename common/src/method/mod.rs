//! The methods' math as pure functions over tensors.
pub mod guidance;
pub mod freescale;
pub mod frecas;
pub mod fusion;
pub mod facfg;
pub mod camap;
