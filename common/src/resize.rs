//! TEMPORARY placeholder until the resize module lands (being written concurrently).
use candle_core::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
pub type Result<T> = std::result::Result<T, ResizeError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    Bicubic,
    Nearest,
    Bilinear,
}
impl std::str::FromStr for ResizeFilter {
    type Err = ResizeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bicubic" => Ok(Self::Bicubic),
            "nearest" => Ok(Self::Nearest),
            "bilinear" => Ok(Self::Bilinear),
            o => Err(ResizeError::Invalid(o.to_string())),
        }
    }
}
impl std::fmt::Display for ResizeFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
pub fn resize(x: &Tensor, height: usize, width: usize, filter: ResizeFilter) -> Result<Tensor> {
    let x = x.to_dtype(candle_core::DType::F32)?;
    Ok(match filter {
        ResizeFilter::Nearest => x.upsample_nearest2d(height, width)?,
        _ => x.upsample_bilinear2d(height, width, false)?,
    })
}
