//! The CLIP tokenizer, built as a `tokenizers::Tokenizer` equivalent to transformers'
//! `CLIPTokenizer` (see `convert_slow_tokenizer.CLIPConverter`): NFC, whitespace runs collapsed
//! to one space, lower-casing, CLIP's split regex, byte-level mapping, BPE with the `</w>`
//! end-of-word suffix, `<|startoftext|> … <|endoftext|>`, truncation to 77 keeping the EOS and
//! padding to 77. SDXL's repository ships no `tokenizer.json`, so building from `vocab.json` +
//! `merges.txt` is the main path.

use std::collections::{BTreeMap, HashMap};
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

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;

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
        let (mut inner, pad_source) = if json_path.is_file() {
            let t = Tokenizer::from_file(&json_path).map_err(|e| malformed(&json_path, e))?;
            (t, json_path)
        } else {
            let t = build_from_vocab(dir, &settings)?;
            (t, dir.join("vocab.json"))
        };
        let id_of = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                malformed(
                    &pad_source,
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
            .map_err(|e| malformed(&pad_source, e))?;
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
                    &merges_path,
                    format!(
                        "line {} is not two space-separated symbols: {line:?}",
                        n + 1
                    ),
                ))
            }
        }
    }
    let get = |tok: &str| {
        vocab
            .get(tok)
            .copied()
            .ok_or_else(|| malformed(&vocab_path, format!("special token {tok:?} is missing")))
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
        .map_err(|e| malformed(&merges_path, e))?;
    let mut t = Tokenizer::new(bpe);
    let ws = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
        .map_err(|e| malformed(&vocab_path, e))?;
    let mut norms: Vec<NormalizerWrapper> = vec![NFC.into(), ws.into()];
    if s.lower_case {
        norms.push(Lowercase.into());
    }
    t.with_normalizer(Some(NormalizerSequence::new(norms)))
        .map_err(|e| malformed(&vocab_path, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| malformed(&vocab_path, e))?;
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
        .map_err(|e| malformed(&vocab_path, e))?;
    Ok(t)
}

/// GPT-2/CLIP byte-to-symbol table, in CLIP's vocabulary order: printable bytes first as
/// themselves, the rest shifted to code points from 256 up.
fn byte_symbols() -> Vec<char> {
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

/// Words the tiny vocabulary's merges are learned from: prompt-flavoured English.
const TINY_CORPUS: &str = "a an the of and in on with at to for from by is are was this that it its
photo photograph picture painting portrait landscape image render illustration drawing sketch
cat cats dog dogs horse horses bird birds fish tiger lion fox wolf bear rabbit owl dragon
astronaut riding sitting standing walking running flying playing reading eating sleeping
man woman men women girl boy child children people person king queen knight robot wizard
city street house castle tower bridge garden forest mountain mountains river lake sea ocean
beach island desert field sky clouds cloud sun sunset sunrise moon stars star night day
red blue green yellow orange purple pink black white gray golden silver dark light bright
beautiful detailed highly intricate sharp focus high quality best masterpiece realistic
cinematic lighting dramatic soft warm cold studio art artstation trending style digital oil
watercolor canvas by of the and very small large big tiny huge old young new ancient modern
futuristic fantasy magic snow rain winter summer spring autumn flower flowers tree trees
grass rock stone water fire ice wood metal glass gold car train ship boat plane space
planet galaxy nebula cyberpunk steampunk vintage retro colorful vibrant epic scene view
close up wide angle shot lens camera depth background foreground center top bottom left
right inside outside under over between behind front table chair room window door wall
food coffee cup bread apple fruit cake hat dress shirt shoes glasses eyes face hair smile
happy sad angry calm quiet lonely peaceful mysterious there their they them these those
what when where which while who why how would could should about after before other
into through during without again further then once here all any both each few more most
some such only own same than too can will just don now one two three four five";

/// Merges learned greedily (most frequent adjacent pair, ties broken by the pair's text) from
/// [`TINY_CORPUS`], the way BPE training does.
fn learn_tiny_merges(max_merges: usize) -> Vec<(String, String)> {
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for w in TINY_CORPUS.split_whitespace() {
        let chars: Vec<char> = w.chars().collect();
        let mut syms: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = syms.last_mut() {
            last.push_str("</w>");
        }
        *words.entry(syms).or_insert(0) += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    let mut merges = Vec::new();
    while merges.len() < max_merges {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (syms, n) in &words {
            for pair in syms.windows(2) {
                *counts
                    .entry((pair[0].clone(), pair[1].clone()))
                    .or_insert(0) += n;
            }
        }
        // BTreeMap iterates in text order, so `max_by_key` keeping the first maximum is stable.
        let mut best: Option<(&(String, String), usize)> = None;
        for (pair, &n) in &counts {
            if best.is_none_or(|(_, bn)| n > bn) {
                best = Some((pair, n));
            }
        }
        let Some(((a, b), _)) = best else { break };
        let (a, b) = (a.clone(), b.clone());
        for (syms, _) in words.iter_mut() {
            let mut i = 0;
            let mut out = Vec::with_capacity(syms.len());
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    out.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    out.push(syms[i].clone());
                    i += 1;
                }
            }
            *syms = out;
        }
        merges.push((a, b));
    }
    merges
}

/// Writes a small but real CLIP-style tokenizer folder (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`, `special_tokens_map.json`) for tiny test models: the 256 byte
/// symbols, their `</w>` forms, 400 learned merges, then `<|startoftext|>` and `<|endoftext|>`.
/// Deterministic. Returns the vocabulary size.
pub fn write_tiny_vocab(dir: &Path, pad_token: &str) -> std::io::Result<usize> {
    fs::create_dir_all(dir)?;
    let mut tokens: Vec<String> = Vec::new();
    let symbols = byte_symbols();
    tokens.extend(symbols.iter().map(|c| c.to_string()));
    tokens.extend(symbols.iter().map(|c| format!("{c}</w>")));
    let merges = learn_tiny_merges(TINY_MERGES);
    for (a, b) in &merges {
        let joined = format!("{a}{b}");
        if !tokens.contains(&joined) {
            tokens.push(joined);
        }
    }
    tokens.push(BOS.to_string());
    tokens.push(EOS.to_string());

    let body: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}:{i}", serde_json::Value::String(t.clone())))
        .collect();
    fs::write(dir.join("vocab.json"), format!("{{{}}}", body.join(",")))?;
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    fs::write(dir.join("merges.txt"), merges_txt)?;
    let config = serde_json::json!({
        "add_prefix_space": false,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": true,
        "do_lower_case": true,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": DEFAULT_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    });
    let specials = serde_json::json!({
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": pad_token,
        "unk_token": EOS,
    });
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    fs::write(dir.join("tokenizer_config.json"), pretty(&config))?;
    fs::write(dir.join("special_tokens_map.json"), pretty(&specials))?;
    Ok(tokens.len())
}

/// Merges in the tiny vocabulary (512 byte symbols + these + 2 specials stays under 1000).
pub const TINY_MERGES: usize = 400;

#[cfg(test)]
mod tests {
    use super::*;

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
    fn tiny_vocab_shape() {
        let (_d, t, n) = tiny(EOS);
        assert!(n <= 1000 && n > 800, "vocab size {n}");
        assert_eq!(t.token_to_id("!"), Some(0));
        assert_eq!(t.token_to_id("!</w>"), Some(256));
        assert_eq!(t.token_to_id(BOS), Some(n as u32 - 2));
        assert_eq!(t.token_to_id(EOS), Some(n as u32 - 1));
        assert!(t.token_to_id("the</w>").is_some());
        // Deterministic.
        let d2 = TempDir::new("again");
        write_tiny_vocab(&d2.0, EOS).unwrap();
        assert_eq!(
            fs::read(_d.0.join("merges.txt")).unwrap(),
            fs::read(d2.0.join("merges.txt")).unwrap()
        );
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
