//! The one error of the maths: a shape, size or parameter it cannot work with (the message
//! names it), or a tensor operation that failed underneath.

#[derive(Debug, thiserror::Error)]
pub enum MathError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, MathError>;

/// `Err(MathError::Invalid(msg))`.
pub fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(MathError::Invalid(msg.into()))
}
