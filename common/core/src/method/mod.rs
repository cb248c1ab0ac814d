//! The methods' math as pure functions over tensors.
pub mod camap;
pub mod facfg;
pub mod frecas;
pub mod freescale;
pub mod fusion;
pub mod guidance;
pub mod params;
