//! `tessera bench kernels`: where the GPU time of a UNet evaluation goes, by kernel category,
//! side by side for tessera (an Nsight Compute CSV of `gpu__time_duration.sum` per kernel
//! launch) and diffusers (the kernel table `bench/gpu/diffusers_baseline.py --profile`
//! writes from torch.profiler). Both sides' kernels are sorted into the same categories by
//! name, so e.g. candle's `bmul_f16` and PyTorch's `vectorized_elementwise_kernel<…Mul…>` land
//! in the same row.

use std::collections::BTreeMap;

use super::{Machine, Report, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Category {
    Gemm,
    Convolution,
    Attention,
    Softmax,
    Normalisation,
    Copies,
    Elementwise,
    Other,
}

pub const CATEGORIES: [Category; 8] = [
    Category::Gemm,
    Category::Convolution,
    Category::Attention,
    Category::Softmax,
    Category::Normalisation,
    Category::Copies,
    Category::Elementwise,
    Category::Other,
];

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Gemm => "GEMM",
            Category::Convolution => "convolution",
            Category::Attention => "attention",
            Category::Softmax => "softmax",
            Category::Normalisation => "normalisation",
            Category::Copies => "copies",
            Category::Elementwise => "elementwise",
            Category::Other => "other",
        }
    }
}

/// Name fragments of each category, tried in this order (the first match wins: a fused
/// attention kernel built on CUTLASS is attention, not GEMM; an implicit-GEMM convolution is a
/// convolution; a copy run by an elementwise template is a copy).
const RULES: [(Category, &[&str]); 7] = [
    (
        Category::Attention,
        &["flash", "fmha", "sdpa", "attention", "attn"],
    ),
    (Category::Softmax, &["softmax"]),
    (
        Category::Normalisation,
        &["norm", "moments", "welford", "computefusedparams"],
    ),
    (
        Category::Convolution,
        &[
            "conv",
            "fprop",
            "im2col",
            "col2im",
            "winograd",
            "implicit_gemm",
        ],
    ),
    (
        Category::Gemm,
        &[
            "gemm",
            "gemv",
            "xmma",
            "cutlass",
            "cublas",
            "wgmma",
            "s16816",
            "h16816",
            "s1688",
            "h1688",
            "splitkreduce",
            "matmul",
            "tensorop",
        ],
    ),
    (
        Category::Copies,
        &[
            "copy",
            "memcpy",
            "memset",
            "transpose",
            "nchwtonhwc",
            "nhwctonchw",
            "catarray",
            "cat_",
            "upsample",
            "index_select",
            "gather",
            "scatter",
            "permute",
            "is_u32",
            "is_u8",
            "is_i64",
        ],
    ),
    (
        Category::Elementwise,
        &[
            "elementwise",
            "unary",
            "binary",
            "affine",
            "add",
            "mul",
            "sub",
            "div",
            "silu",
            "gelu",
            "glu",
            "sigmoid",
            "tanh",
            "exp",
            "sqr",
            "cast",
            "where",
            "fill",
            "const_set",
            "neg",
            "recip",
            "relu",
            "pow",
            "maximum",
            "minimum",
            "clamp",
            "functor",
        ],
    ),
];

/// The category of a kernel, from its name.
pub fn categorise(kernel: &str) -> Category {
    let name = kernel.to_ascii_lowercase();
    // Random-number kernels ("normal", candle's "unormcdf") are not normalisations.
    let name = name.replace("normal", "").replace("normcdf", "");
    RULES
        .iter()
        .find(|(_, frags)| frags.iter().any(|f| name.contains(f)))
        .map_or(Category::Other, |(c, _)| *c)
}

/// One kernel's launches and total device time.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub launches: u64,
    pub ms: f64,
}

/// The fields of one CSV line (RFC 4180 quoting: `"a, b"`, `""` for a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut field) = (Vec::new(), String::new());
    let mut quoted = false;
    let mut chars = line.trim_end_matches(['\r', '\n']).chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Milliseconds per unit of an ncu time metric.
fn unit_ms(unit: &str) -> Option<f64> {
    Some(match unit.trim() {
        "nsecond" | "ns" => 1e-6,
        "usecond" | "us" => 1e-3,
        "msecond" | "ms" => 1.0,
        "second" | "s" => 1e3,
        _ => return None,
    })
}

/// Sums launches by kernel name, slowest first.
fn aggregate(launches: impl IntoIterator<Item = (String, u64, f64)>) -> Vec<KernelTime> {
    let mut by_name: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for (name, n, ms) in launches {
        let e = by_name.entry(name).or_default();
        e.0 += n;
        e.1 += ms;
    }
    let mut out: Vec<KernelTime> = by_name
        .into_iter()
        .map(|(name, (launches, ms))| KernelTime { name, launches, ms })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(&b.name)));
    out
}

fn column(header: &[String], name: &str, what: &str) -> Result<usize, String> {
    header
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| format!("{what}: no \"{name}\" column in the header"))
}

/// An ncu CSV (`ncu --csv --metrics gpu__time_duration.sum …`): one row per kernel launch and
/// metric; `==PROF==` lines and anything before the header are skipped.
pub fn parse_ncu_csv(text: &str) -> Result<Vec<KernelTime>, String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("\"ID\""));
    let header = csv_fields(
        lines
            .next()
            .ok_or("ncu CSV: no header line (\"ID\",…); was it written with --csv?")?,
    );
    let what = "ncu CSV";
    let (kernel, metric) = (
        column(&header, "Kernel Name", what)?,
        column(&header, "Metric Name", what)?,
    );
    let (unit, value) = (
        column(&header, "Metric Unit", what)?,
        column(&header, "Metric Value", what)?,
    );
    let mut launches = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.starts_with("==") || line.trim().is_empty() {
            continue;
        }
        let f = csv_fields(line);
        if f.len() < header.len() {
            return Err(format!("ncu CSV line {}: {} fields", i + 2, f.len()));
        }
        if f[metric] != "gpu__time_duration.sum" {
            continue;
        }
        let scale = unit_ms(&f[unit])
            .ok_or_else(|| format!("ncu CSV line {}: time unit {:?}", i + 2, f[unit]))?;
        // ncu may group thousands with commas inside the quoted value.
        let v: f64 = f[value]
            .replace(',', "")
            .parse()
            .map_err(|_| format!("ncu CSV line {}: value {:?}", i + 2, f[value]))?;
        launches.push((f[kernel].clone(), 1, v * scale));
    }
    if launches.is_empty() {
        return Err("ncu CSV: no gpu__time_duration.sum rows".into());
    }
    Ok(aggregate(launches))
}

/// The kernel table of `diffusers_baseline.py --profile`: `kernel,launches,total_us`.
pub fn parse_torch_csv(text: &str) -> Result<Vec<KernelTime>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = csv_fields(lines.next().ok_or("torch kernel table: empty")?);
    let what = "torch kernel table";
    let (kernel, launches_col, total) = (
        column(&header, "kernel", what)?,
        column(&header, "launches", what)?,
        column(&header, "total_us", what)?,
    );
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let f = csv_fields(line);
        let bad = || format!("torch kernel table line {}: {line:?}", i + 2);
        let n: u64 = f
            .get(launches_col)
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?;
        let us: f64 = f.get(total).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        rows.push((f.get(kernel).ok_or_else(bad)?.clone(), n, us * 1e-3));
    }
    if rows.is_empty() {
        return Err("torch kernel table: no kernels".into());
    }
    Ok(aggregate(rows))
}

/// Milliseconds and launches per category.
pub fn by_category(kernels: &[KernelTime]) -> BTreeMap<Category, (f64, u64)> {
    let mut out: BTreeMap<Category, (f64, u64)> =
        CATEGORIES.iter().map(|&c| (c, (0.0, 0))).collect();
    for k in kernels {
        let e = out.entry(categorise(&k.name)).or_default();
        e.0 += k.ms;
        e.1 += k.launches;
    }
    out
}

/// One input: a label and its kernels.
pub struct Side {
    pub label: String,
    pub kernels: Vec<KernelTime>,
}

/// A kernel name short enough for a table cell.
fn short(name: &str) -> String {
    let name = name.strip_prefix("void ").unwrap_or(name);
    if name.chars().count() <= 70 {
        name.to_string()
    } else {
        format!("{}…", name.chars().take(69).collect::<String>())
    }
}

/// The side-by-side category table (ratios against the last side), then each side's `top`
/// slowest kernels.
pub fn report(sides: &[Side], top: usize, command: String) -> Report {
    let cats: Vec<_> = sides.iter().map(|s| by_category(&s.kernels)).collect();
    let totals: Vec<(f64, u64)> = cats
        .iter()
        .map(|c| c.values().fold((0.0, 0), |a, v| (a.0 + v.0, a.1 + v.1)))
        .collect();
    let last = sides.len().saturating_sub(1);
    let mut header = vec!["category".to_string()];
    for s in sides {
        header.extend([
            format!("{} ms", s.label),
            format!("{} %", s.label),
            format!("{} launches", s.label),
        ]);
    }
    for s in &sides[..last] {
        header.push(format!("{} / {}", s.label, sides[last].label));
    }
    let mut table = Table {
        header,
        rows: Vec::new(),
    };
    let row = |name: &str, vals: &dyn Fn(usize) -> (f64, u64)| {
        let mut r = vec![name.to_string()];
        for (i, t) in totals.iter().enumerate() {
            let (ms, n) = vals(i);
            let pct = if t.0 > 0.0 { 100.0 * ms / t.0 } else { 0.0 };
            r.extend([format!("{ms:.2}"), format!("{pct:.1}"), n.to_string()]);
        }
        for i in 0..last {
            let (ms, base) = (vals(i).0, vals(last).0);
            r.push(if base > 0.0 {
                format!("{:.2}×", ms / base)
            } else {
                "–".into()
            });
        }
        r
    };
    for c in CATEGORIES {
        table.rows.push(row(c.name(), &|i| cats[i][&c]));
    }
    table.rows.push(row("total", &|i| totals[i]));
    let mut tables = vec![table];
    for s in sides.iter().filter(|_| top > 0) {
        let mut t = Table::new(&["kernel", "category", "launches", "ms"]);
        t.header[0] = format!("{}: slowest kernels", s.label);
        for k in s.kernels.iter().take(top) {
            t.row(vec![
                short(&k.name),
                categorise(&k.name).name().into(),
                k.launches.to_string(),
                format!("{:.3}", k.ms),
            ]);
        }
        tables.push(t);
    }
    Report {
        title: "GPU time by kernel category".into(),
        command,
        machine: Machine::probe(),
        tables,
        notes: vec![
            "Device time summed over the kernels each input captured (profile one evaluation on \
             each side); the ratio columns compare each input with the last one."
                .into(),
            "Without cuDNN, candle computes a convolution as im2col (convolution) plus a cuBLAS \
             GEMM (GEMM), where cuDNN runs one implicit-GEMM kernel (convolution): compare \
             GEMM + convolution together across such builds."
                .into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NCU: &str = include_str!("../../../bench/gpu/samples/ncu_sample.csv");
    const TORCH: &str = include_str!("../../../bench/gpu/samples/torch_kernels_sample.csv");

    #[test]
    fn names_from_both_sides_land_in_the_same_categories() {
        use Category::*;
        let cases = [
            ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1_execute_segment_k_off_kernel__5x_cublas", Gemm),
            ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_f16_s161616gemm_f16_32x32_128x2_tn_align8>(Params)", Gemm),
            ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nchw_tilesize128x128x64", Convolution),
            ("im2col_f16", Convolution),
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", Attention),
            ("tessera_flash_attn_f16_d64", Attention),
            ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<…>::Params)", Attention),
            ("softmax_f16", Softmax),
            ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, c10::Half, float, c10::Half>(…)", Softmax),
            ("tessera_group_norm_apply_f16", Normalisation),
            ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>(long, float, c10::Half const*, float*, float*)", Normalisation),
            ("layernorm_f16", Normalisation),
            ("unormcdf_f16", Other),
            ("ucopy_f16", Copies),
            ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::Half)#1}>(at::TensorIteratorBase&, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::Half)#1} const&)::{lambda(int)#1}>(int, …)", Copies),
            ("Memcpy DtoD (Device -> Device)", Copies),
            ("upsample_nearest2d_f16", Copies),
            ("bmul_f16", Elementwise),
            ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>)", Elementwise),
            ("tessera_geglu_f16", Elementwise),
            ("fast_sum_f32", Other),
        ];
        for (name, want) in cases {
            assert_eq!(categorise(name), want, "{name}");
        }
    }

    #[test]
    fn reads_the_committed_samples() {
        let ncu = parse_ncu_csv(NCU).unwrap();
        // Launches of the same kernel are summed; units (ns, us, ms) converted.
        let gemm = ncu
            .iter()
            .find(|k| k.name.starts_with("sm90_xmma_gemm"))
            .unwrap();
        assert_eq!(gemm.launches, 3);
        assert!(
            (gemm.ms - (0.212_448 + 0.211_936 + 1.051_2)).abs() < 1e-9,
            "{}",
            gemm.ms
        );
        let torch = parse_torch_csv(TORCH).unwrap();
        let sdpa = torch
            .iter()
            .find(|k| categorise(&k.name) == Category::Attention)
            .unwrap();
        assert_eq!(sdpa.launches, 6);
        // Slowest first.
        assert!(torch.windows(2).all(|w| w[0].ms >= w[1].ms));
        let total: f64 = ncu.iter().map(|k| k.ms).sum();
        let cats = by_category(&ncu);
        let sum: f64 = cats.values().map(|v| v.0).sum();
        assert!((total - sum).abs() < 1e-9);
        assert!(cats[&Category::Softmax].0 > 0.0 && cats[&Category::Convolution].0 > 0.0);
    }

    #[test]
    fn prints_both_sides_with_totals_and_ratios() {
        let sides = [
            Side {
                label: "tessera".into(),
                kernels: parse_ncu_csv(NCU).unwrap(),
            },
            Side {
                label: "diffusers".into(),
                kernels: parse_torch_csv(TORCH).unwrap(),
            },
        ];
        let r = report(&sides, 3, "tessera bench kernels".into());
        let text = r.text();
        for want in [
            "GEMM",
            "attention",
            "total",
            "tessera / diffusers",
            "slowest kernels",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        let total = r.tables[0].rows.last().unwrap();
        assert_eq!(total[0], "total");
        assert_eq!(total[2], "100.0");
        assert_eq!(r.tables[1].rows.len(), 3);
    }

    #[test]
    fn bad_files_get_errors_that_say_what_is_wrong() {
        let e = parse_ncu_csv("==PROF== Disconnected\n").unwrap_err();
        assert!(e.contains("--csv"), "{e}");
        let e = parse_ncu_csv("\"ID\",\"Kernel Name\"\n\"0\",\"k\"\n").unwrap_err();
        assert!(e.contains("Metric Name"), "{e}");
        let e = parse_torch_csv("kernel,launches,total_us\nk,two,3\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert_eq!(csv_fields(r#""a, ""b""",c,"#), ["a, \"b\"", "c", ""]);
    }
}
