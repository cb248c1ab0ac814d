//! The CLIP tokenizer, built as a `tokenizers::Tokenizer` equivalent to transformers'
//! `CLIPTokenizer` (see `convert_slow_tokenizer.CLIPConverter`): NFC, whitespace runs collapsed
//! to one space, lower-casing, CLIP's split regex, byte-level mapping, BPE with the `</w>`
//! end-of-word suffix, `<|startoftext|> … <|endoftext|>`, truncation to 77 keeping the EOS and
//! padding to 77. SDXL's repository ships no `tokenizer.json`, so building from `vocab.json` +
//! `merges.txt` is the main path.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PaddingDirection, PaddingParams, PaddingStrategy,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

pub(crate) const BOS: &str = "<|startoftext|>";
pub(crate) const EOS: &str = "<|endoftext|>";
pub(crate) const DEFAULT_MAX_LENGTH: usize = 77;

/// CLIP's pre-tokenization pattern (transformers 5 also lets the special tokens through whole).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path} is missing; a CLIP tokenizer directory needs tokenizer.json or vocab.json + merges.txt")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is malformed: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("cannot tokenize {text:?}: {message}")]
    Encode { text: String, message: String },
}

fn malformed(path: &Path, message: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Malformed {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn read(path: &Path) -> Result<String, TokenizerError> {
    if !path.is_file() {
        return Err(TokenizerError::Missing {
            path: path.to_path_buf(),
        });
    }
    fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The parts of `tokenizer_config.json` that shape the tokenizer.
#[derive(Debug, Clone)]
struct TokenizerSettings {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
    lower_case: bool,
}

impl TokenizerSettings {
    fn read(dir: &Path) -> Result<Self, TokenizerError> {
        let mut s = TokenizerSettings {
            bos: BOS.to_string(),
            eos: EOS.to_string(),
            unk: EOS.to_string(),
            pad: EOS.to_string(),
            max_length: DEFAULT_MAX_LENGTH,
            lower_case: true,
        };
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(s);
        }
        let json: serde_json::Value =
            serde_json::from_str(&read(&path)?).map_err(|e| malformed(&path, e))?;
        // A special token is written either as a string or as an AddedToken object.
        let token = |key: &str| -> Result<Option<String>, TokenizerError> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
                    _ => Err(malformed(&path, format!("{key} has no string \"content\""))),
                },
                Some(_) => Err(malformed(
                    &path,
                    format!("{key} is neither a string nor a token object"),
                )),
            }
        };
        if let Some(t) = token("bos_token")? {
            s.bos = t;
        }
        if let Some(t) = token("eos_token")? {
            s.eos = t;
        }
        if let Some(t) = token("unk_token")? {
            s.unk = t;
        }
        if let Some(t) = token("pad_token")? {
            s.pad = t;
        }
        // transformers writes a huge sentinel when no limit is known; CLIP's positions stop at 77.
        if let Some(n) = json.get("model_max_length").and_then(|v| v.as_f64()) {
            if (1.0..=1e6).contains(&n) {
                s.max_length = n as usize;
            }
        }
        if let Some(b) = json.get("do_lower_case").and_then(|v| v.as_bool()) {
            s.lower_case = b;
        }
        if s.max_length < 2 {
            return Err(malformed(
                &path,
                "model_max_length must leave room for BOS and EOS",
            ));
        }
        Ok(s)
    }
}

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// `dir` is a `tokenizer/` or `tokenizer_2/` folder of a diffusers model.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let settings = TokenizerSettings::read(dir)?;
        let json_path = dir.join("tokenizer.json");
        let (inner, pad_source) = if json_path.is_file() {
            let t = Tokenizer::from_file(&json_path).map_err(|e| malformed(&json_path, e))?;
            (t, json_path)
        } else {
            let t = build_from_vocab(dir, &settings)?;
            (t, dir.join("vocab.json"))
        };
        Self::finish(inner, &settings, &pad_source)
    }

    /// The standard CLIP tokenizer (OpenAI's 49408-token BPE, as `openai/clip-vit-large-patch14`
    /// and the SD 2.x / SDXL repositories ship it), padded with `pad`: built from the BPE file
    /// Tessera carries, for single-file checkpoints, which hold no tokenizer.
    pub fn standard(pad: &str) -> Result<Self, TokenizerError> {
        let source = PathBuf::from(STANDARD_BPE_NAME);
        let (vocab, merges) = standard_vocab().map_err(|e| malformed(&source, e))?;
        let settings = TokenizerSettings {
            bos: BOS.to_string(),
            eos: EOS.to_string(),
            unk: EOS.to_string(),
            pad: pad.to_string(),
            max_length: DEFAULT_MAX_LENGTH,
            lower_case: true,
        };
        let inner = build(vocab, merges, &settings, &source)?;
        Self::finish(inner, &settings, &source)
    }

    /// Checks the special tokens and sets truncation and padding to `max_length`.
    fn finish(
        mut inner: Tokenizer,
        settings: &TokenizerSettings,
        pad_source: &Path,
    ) -> Result<Self, TokenizerError> {
        let id_of = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                malformed(
                    pad_source,
                    format!("token {tok:?} is not in the vocabulary"),
                )
            })
        };
        let pad_id = id_of(&settings.pad)?;
        id_of(&settings.bos)?;
        id_of(&settings.eos)?;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: settings.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| malformed(pad_source, e))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(settings.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: settings.pad.clone(),
        }));
        Ok(Self {
            inner,
            max_length: settings.max_length,
            pad_id,
        })
    }

    /// Exactly `max_length` ids: BOS, the prompt's tokens (truncated), EOS, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_string(),
                message: e.to_string(),
            })?;
        let ids = enc.get_ids().to_vec();
        if ids.len() != self.max_length {
            return Err(TokenizerError::Encode {
                text: text.to_string(),
                message: format!("produced {} ids instead of {}", ids.len(), self.max_length),
            });
        }
        Ok(ids)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

fn build_from_vocab(dir: &Path, s: &TokenizerSettings) -> Result<Tokenizer, TokenizerError> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab_text = read(&vocab_path)?;
    let merges_text = read(&merges_path)?;
    let vocab: HashMap<String, u32> =
        serde_json::from_str(&vocab_text).map_err(|e| malformed(&vocab_path, e))?;
    let merges = parse_merges(&merges_text, &merges_path)?;
    build(vocab, merges, s, &vocab_path)
}

fn parse_merges(
    merges_text: &str,
    merges_path: &Path,
) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut merges = Vec::new();
    for (n, line) in merges_text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(malformed(
                    merges_path,
                    format!(
                        "line {} is not two space-separated symbols: {line:?}",
                        n + 1
                    ),
                ))
            }
        }
    }
    Ok(merges)
}

/// The CLIP tokenizer over `vocab` and `merges` (see the module doc for its pieces).
fn build(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    s: &TokenizerSettings,
    vocab_path: &Path,
) -> Result<Tokenizer, TokenizerError> {
    let merges_path = vocab_path;
    let get = |tok: &str| {
        vocab
            .get(tok)
            .copied()
            .ok_or_else(|| malformed(vocab_path, format!("special token {tok:?} is missing")))
    };
    let (bos_id, eos_id) = (get(&s.bos)?, get(&s.eos)?);
    get(&s.unk)?;
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .unk_token(s.unk.clone())
        .build()
        .map_err(|e| malformed(merges_path, e))?;
    let mut t = Tokenizer::new(bpe);
    let ws = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
        .map_err(|e| malformed(vocab_path, e))?;
    let mut norms: Vec<NormalizerWrapper> = vec![NFC.into(), ws.into()];
    if s.lower_case {
        norms.push(Lowercase.into());
    }
    t.with_normalizer(Some(NormalizerSequence::new(norms)))
        .map_err(|e| malformed(vocab_path, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| malformed(vocab_path, e))?;
    let pre: Vec<PreTokenizerWrapper> =
        vec![split.into(), ByteLevel::new(false, true, true).into()];
    t.with_pre_tokenizer(Some(PreTokenizerSequence::new(pre)));
    t.with_decoder(Some(ByteLevel::default()));
    t.with_post_processor(Some(
        RobertaProcessing::new((s.eos.clone(), eos_id), (s.bos.clone(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    // transformers registers every special token (pad included, e.g. "!") as an added token, so
    // such text is matched whole before BPE.
    let mut specials: Vec<AddedToken> = Vec::new();
    for tok in [&s.bos, &s.eos, &s.unk, &s.pad] {
        if !specials.iter().any(|a| &a.content == tok) {
            specials.push(AddedToken::from(tok.clone(), true));
        }
    }
    t.add_special_tokens(specials)
        .map_err(|e| malformed(vocab_path, e))?;
    Ok(t)
}

/// GPT-2/CLIP byte-to-symbol table, in CLIP's vocabulary order: printable bytes first as
/// themselves, the rest shifted to code points from 256 up.
pub(crate) fn byte_symbols() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out: Vec<char> = (0u32..256)
        .filter(|b| printable(*b))
        .filter_map(char::from_u32)
        .collect();
    let mut next = 256u32;
    for b in 0u32..256 {
        if !printable(b) {
            if let Some(c) = char::from_u32(next) {
                out.push(c);
            }
            next += 1;
        }
    }
    out
}

/// BPE merges, in rank order.
pub(crate) type Merges = Vec<(String, String)>;

const STANDARD_BPE_NAME: &str = "the built-in CLIP vocabulary (bpe_simple_vocab_16e6)";

/// OpenAI CLIP's BPE merges as open_clip ships them (`bpe_simple_vocab_16e6.txt.gz`, MIT).
static STANDARD_BPE: &[u8] = include_bytes!("../../assets/clip_bpe_simple_vocab_16e6.txt.gz");

/// The vocabulary and merges derived from the BPE file the way CLIP's `SimpleTokenizer` does:
/// merges are lines 1 ..= 48894; the vocabulary is the 256 byte symbols, the same with `</w>`,
/// one token per merge, then `<|startoftext|>` and `<|endoftext|>` (49408 in all).
pub(crate) fn standard_vocab() -> Result<(HashMap<String, u32>, Merges), String> {
    use std::io::Read;
    const MERGES: usize = 49152 - 256 - 2;
    let mut text = String::new();
    flate2::read::GzDecoder::new(STANDARD_BPE)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let lines: Vec<&str> = text.split('\n').collect();
    let lines = lines.get(1..=MERGES).ok_or("fewer merges than CLIP's")?;
    let mut merges = Vec::with_capacity(MERGES);
    for line in lines {
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| format!("bad merge {line:?}"))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let symbols: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    let tokens = symbols
        .iter()
        .cloned()
        .chain(symbols.iter().map(|s| format!("{s}</w>")))
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain([BOS.to_string(), EOS.to_string()]);
    let vocab = tokens.zip(0u32..).collect();
    Ok((vocab, merges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random_models::tiny_vocab::write_tiny_vocab;

    #[test]
    fn the_standard_vocabulary_gives_clips_published_ids() {
        let t = ClipTokenizer::standard("!").unwrap();
        let ids = t.encode("a photo of a cat").unwrap();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!((ids[7], t.pad_id()), (0, 0));
        let t = ClipTokenizer::standard(EOS).unwrap();
        assert_eq!(t.pad_id(), 49407);
        assert_eq!(t.token_to_id("<|startoftext|>"), Some(49406));
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "tessera-tok-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tiny(pad: &str) -> (TempDir, ClipTokenizer, usize) {
        let d = TempDir::new(if pad == "!" { "bang" } else { "eot" });
        let n = write_tiny_vocab(&d.0, pad).unwrap();
        let t = ClipTokenizer::from_dir(&d.0).unwrap();
        (d, t, n)
    }

    #[test]
    fn bos_eos_padding_case_and_whitespace() {
        let (_d, t, _) = tiny(EOS);
        let bos = t.token_to_id(BOS).unwrap();
        let eos = t.token_to_id(EOS).unwrap();
        let ids = t.encode("a photo of a cat").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], bos);
        let a = t.token_to_id("a</w>").unwrap();
        let cat = t.token_to_id("cat</w>").unwrap();
        assert_eq!(ids[1], a);
        let first_eos = ids.iter().position(|&i| i == eos).unwrap();
        assert_eq!(ids[first_eos - 1], cat);
        assert!(ids[first_eos..].iter().all(|&i| i == eos));
        assert_eq!(t.encode("  A   Photo\tof\n a CAT ").unwrap(), ids);
        let empty = t.encode("").unwrap();
        assert_eq!(empty[0], bos);
        assert!(empty[1..].iter().all(|&i| i == eos));
    }

    #[test]
    fn bang_padding_and_truncation() {
        let (_d, t, _) = tiny("!");
        assert_eq!(t.pad_id(), 0);
        let eos = t.token_to_id(EOS).unwrap();
        let ids = t.encode("a cat").unwrap();
        assert_eq!(ids[3], eos);
        assert!(ids[4..].iter().all(|&i| i == 0));
        let long = vec!["astronaut"; 200].join(" ");
        let ids = t.encode(&long).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], eos);
        assert!(!ids[1..76].contains(&eos));
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let d = TempDir::new("bad");
        let e = ClipTokenizer::from_dir(&d.0).unwrap_err();
        assert!(e.to_string().contains("vocab.json"), "{e}");
        write_tiny_vocab(&d.0, EOS).unwrap();
        fs::write(d.0.join("merges.txt"), "#version: 0.2\nonlyone\n").unwrap();
        let e = ClipTokenizer::from_dir(&d.0).unwrap_err();
        assert!(e.to_string().contains("merges.txt"), "{e}");
        fs::write(d.0.join("vocab.json"), "{not json").unwrap();
        let e = ClipTokenizer::from_dir(&d.0).unwrap_err();
        assert!(e.to_string().contains("vocab.json"), "{e}");
    }
}
