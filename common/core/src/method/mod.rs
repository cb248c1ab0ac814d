//! The methods' math as pure functions over tensors, one module per piece. Where each method's
//! pieces are (ARCHITECTURE.md has the same table with the worker's side):
//! - FreeScale: [`freescale`] (restrained structure, dilation schedule), [`fusion`] (scale
//!   fusion of the local and global predictions), the views in `crate::tiling`; inside the
//!   UNet, `worker/src/hooks/` (scale-fusion attention, dilation, FreeU).
//! - FreCaS: [`frecas`] (stage timing), [`facfg`] (frequency-aware CFG), [`camap`]
//!   (cross-attention map reuse; capture and injection in `worker/src/hooks/cross_attention.rs`).
//! - Both: [`guidance`] (plain CFG), [`params`] (the method flags as given; `crate::plan`
//!   resolves their defaults and combines them, `hybrid` included).
pub mod camap;
pub mod facfg;
pub mod frecas;
pub mod freescale;
pub mod fusion;
pub mod guidance;
pub mod params;
