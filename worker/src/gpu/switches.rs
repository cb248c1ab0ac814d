//! Runtime switches for each GPU speed lever, read once from the environment, so one GPU run
//! can measure every lever both ways (bench/gpu/profile.sh) without rebuilding.
//!
//! `TESSERA_GPU_LEVERS` picks the base set: `none` (the default: tessera as it was before the
//! levers existed, since no GPU run has yet shown any lever correct and faster), `host` (the
//! host-side levers) or `all` (those and the fused kernels). Each `TESSERA_GPU_<LEVER>`
//! variable (`1`/`0`, `on`/`off`, `true`/`false`) then overrides its lever. Once a GPU run has
//! measured a lever, [`Switches::DEFAULT`] is where it is turned on for everyone.

use std::sync::OnceLock;

/// Which levers are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Switches {
    /// cudarc creates no CUDA events per allocation (they are never waited on: candle uses
    /// one stream per thread and never enters cudarc's multi-stream mode).
    pub events_off: bool,
    /// The device's memory pool keeps freed memory instead of returning it to the driver at
    /// every synchronisation (its release threshold is raised), as PyTorch's caching
    /// allocator does.
    pub pool_keep: bool,
    /// During each denoiser evaluation candle reuses device copies of the shape/stride
    /// parameters of strided ops instead of copying them from pageable host memory every op.
    pub param_cache: bool,
    /// Attention through tessera's fused FlashAttention-2-style kernel (no score matrix).
    pub flash_attn: bool,
    /// GroupNorm (and the SiLU after it) in two fused kernels.
    pub fused_norm: bool,
    /// GEGLU (value · GELU(gate)) in one kernel.
    pub fused_geglu: bool,
}

/// The lever names, as they appear in the environment (upper-cased after `TESSERA_GPU_`) and
/// in benchmark output.
pub const LEVERS: [&str; 6] = [
    "events_off",
    "pool_keep",
    "param_cache",
    "flash_attn",
    "fused_norm",
    "fused_geglu",
];

impl Switches {
    /// What runs when nothing is set: every lever off until a GPU run has measured it.
    pub const DEFAULT: Switches = Switches::NONE;
    /// The host-side levers on, the fused kernels off.
    pub const HOST: Switches = Switches {
        events_off: true,
        pool_keep: true,
        param_cache: true,
        flash_attn: false,
        fused_norm: false,
        fused_geglu: false,
    };
    pub const NONE: Switches = Switches {
        events_off: false,
        pool_keep: false,
        param_cache: false,
        flash_attn: false,
        fused_norm: false,
        fused_geglu: false,
    };
    pub const ALL: Switches = Switches {
        events_off: true,
        pool_keep: true,
        param_cache: true,
        flash_attn: true,
        fused_norm: true,
        fused_geglu: true,
    };

    /// The names of the levers that are on, in [`LEVERS`] order.
    pub fn on(&self) -> Vec<&'static str> {
        let mut s = *self;
        LEVERS.into_iter().filter(|l| *s.lever_mut(l)).collect()
    }

    fn lever_mut(&mut self, name: &str) -> &mut bool {
        match name {
            "events_off" => &mut self.events_off,
            "pool_keep" => &mut self.pool_keep,
            "param_cache" => &mut self.param_cache,
            "flash_attn" => &mut self.flash_attn,
            "fused_norm" => &mut self.fused_norm,
            _ => &mut self.fused_geglu,
        }
    }

    /// The switches a lookup function gives (the environment, or a map in tests).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Switches, String> {
        let mut s = match get("TESSERA_GPU_LEVERS").as_deref().map(str::trim) {
            None | Some("") | Some("default") => Switches::DEFAULT,
            Some("none") => Switches::NONE,
            Some("host") => Switches::HOST,
            Some("all") => Switches::ALL,
            Some(other) => {
                return Err(format!(
                    "TESSERA_GPU_LEVERS={other:?}: use none, host, all or default"
                ))
            }
        };
        for lever in LEVERS {
            let var = format!("TESSERA_GPU_{}", lever.to_uppercase());
            if let Some(v) = get(&var) {
                *s.lever_mut(lever) = match v.trim().to_ascii_lowercase().as_str() {
                    "1" | "on" | "true" => true,
                    "0" | "off" | "false" => false,
                    _ => return Err(format!("{var}={v:?}: use 1 or 0")),
                };
            }
        }
        Ok(s)
    }
}

static SWITCHES: OnceLock<Result<Switches, String>> = OnceLock::new();

/// The process's switches, read from the environment on first use; an invalid value is an
/// error naming the variable ([`crate::device::open_device`] reports it for CUDA devices).
pub fn load() -> Result<Switches, String> {
    SWITCHES
        .get_or_init(|| Switches::parse(|k| std::env::var(k).ok()))
        .clone()
}

/// The switches as the model code reads them: invalid settings (already reported when the
/// device was opened) fall back to the defaults.
pub fn get() -> Switches {
    load().unwrap_or(Switches::DEFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Switches, String> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Switches::parse(|k| env.get(k).cloned())
    }

    #[test]
    fn base_sets_and_per_lever_overrides() {
        // Unmeasured levers stay off unless asked for.
        assert_eq!(parse(&[]).unwrap(), Switches::NONE);
        assert_eq!(
            parse(&[("TESSERA_GPU_LEVERS", "default")]).unwrap(),
            Switches::DEFAULT
        );
        assert_eq!(
            parse(&[("TESSERA_GPU_LEVERS", " host ")]).unwrap(),
            Switches::HOST
        );
        assert_eq!(
            Switches::HOST.on(),
            ["events_off", "pool_keep", "param_cache"]
        );
        let s = parse(&[
            ("TESSERA_GPU_LEVERS", "all"),
            ("TESSERA_GPU_FLASH_ATTN", "off"),
            ("TESSERA_GPU_POOL_KEEP", "0"),
        ])
        .unwrap();
        assert!(!s.flash_attn && !s.pool_keep && s.fused_norm && s.events_off);
        let s = parse(&[
            ("TESSERA_GPU_LEVERS", "host"),
            ("TESSERA_GPU_FUSED_GEGLU", "1"),
        ])
        .unwrap();
        assert!(s.fused_geglu && !s.flash_attn && s.param_cache);
        assert_eq!(
            s.on(),
            ["events_off", "pool_keep", "param_cache", "fused_geglu"]
        );
        let s = parse(&[("TESSERA_GPU_EVENTS_OFF", "true")]).unwrap();
        assert_eq!(s.on(), ["events_off"]);
        assert!(Switches::NONE.on().is_empty());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = parse(&[("TESSERA_GPU_LEVERS", "fast")]).unwrap_err();
        assert!(
            e.contains("TESSERA_GPU_LEVERS") && e.contains("none, host, all"),
            "{e}"
        );
        let e = parse(&[("TESSERA_GPU_FLASH_ATTN", "yes please")]).unwrap_err();
        assert!(
            e.contains("TESSERA_GPU_FLASH_ATTN") && e.contains("1 or 0"),
            "{e}"
        );
    }
}
