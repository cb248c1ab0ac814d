//! Stable Diffusion 3's denoiser, diffusers' `SD3Transformer2DModel` (MMDiT), with diffusers'
//! parameter names: the model ([`transformer`]), its joint blocks and adaptive norms
//! ([`joint_block`]) and the joint attention ([`joint_attention`]). Its text encoders are the
//! CLIP model of [`super::text`] and the T5 encoder of [`super::t5`]; its VAE is
//! [`super::vae`] with 16 channels and a shift.
pub mod joint_attention;
pub mod joint_block;
pub mod transformer;
