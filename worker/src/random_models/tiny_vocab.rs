//! The tiny CLIP vocabulary of the random test models: the byte symbols, merges learned from a
//! small prompt-flavoured corpus, and the two special tokens, written as a real tokenizer
//! folder that [`ClipTokenizer`](crate::model::tokenizer::ClipTokenizer) reads like any other.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::model::tokenizer::{byte_symbols, BOS, DEFAULT_MAX_LENGTH, EOS};

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

/// The words of the tiny corpus, in order (the T5 test vocabulary takes its words from them).
pub(super) fn corpus_words() -> impl Iterator<Item = &'static str> {
    TINY_CORPUS.split_whitespace()
}

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
    write_vocab(dir, &tokens, &merges, pad_token)
}

/// Writes the standard CLIP vocabulary Tessera ships (49408 tokens, 48894 merges) as a
/// tokenizer folder, as the published full-size models have it. Returns the vocabulary size.
pub fn write_standard_vocab(dir: &Path, pad_token: &str) -> std::io::Result<usize> {
    let (vocab, merges) = crate::model::tokenizer::standard_vocab()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut tokens: Vec<(u32, String)> = vocab.into_iter().map(|(t, i)| (i, t)).collect();
    tokens.sort();
    let tokens: Vec<String> = tokens.into_iter().map(|(_, t)| t).collect();
    write_vocab(dir, &tokens, &merges, pad_token)
}

/// A CLIP tokenizer folder: `tokens` in id order, `merges` in rank order.
fn write_vocab(
    dir: &Path,
    tokens: &[String],
    merges: &[(String, String)],
    pad_token: &str,
) -> std::io::Result<usize> {
    fs::create_dir_all(dir)?;
    let body: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}:{i}", serde_json::Value::String(t.clone())))
        .collect();
    fs::write(dir.join("vocab.json"), format!("{{{}}}", body.join(",")))?;
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in merges {
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
    use crate::model::tokenizer::ClipTokenizer;

    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tessera-vocab-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        TempDir(p)
    }

    #[test]
    fn tiny_vocab_shape() {
        let d = temp_dir("shape");
        let n = write_tiny_vocab(&d.0, EOS).unwrap();
        let t = ClipTokenizer::from_dir(&d.0).unwrap();
        assert!(n <= 1000 && n > 800, "vocab size {n}");
        assert_eq!(t.token_to_id("!"), Some(0));
        assert_eq!(t.token_to_id("!</w>"), Some(256));
        assert_eq!(t.token_to_id(BOS), Some(n as u32 - 2));
        assert_eq!(t.token_to_id(EOS), Some(n as u32 - 1));
        assert!(t.token_to_id("the</w>").is_some());
        // Deterministic.
        let d2 = temp_dir("again");
        write_tiny_vocab(&d2.0, EOS).unwrap();
        assert_eq!(
            fs::read(d.0.join("merges.txt")).unwrap(),
            fs::read(d2.0.join("merges.txt")).unwrap()
        );
    }
}
