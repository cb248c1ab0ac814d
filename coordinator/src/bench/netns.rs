//! `bench scale --link-gbit`: a run inside its own network namespace whose loopback is
//! rate-limited, so the whole loopback cluster (Redis, the coordinator, the workers) talks over
//! a link of a given speed. The namespace is made with `unshare --net`, its loopback brought up
//! with `ip` and limited with a token bucket (`tc qdisc … tbf`); it disappears with the last
//! process inside it, so nothing is left behind on the host.
//!
//! Every packet on a loopback crosses it once, so the limit caps the sum of all the cluster's
//! traffic — about what one Redis node on a full-duplex link of half that speed moves in and
//! out.

use std::process::Command;

use super::{io, BenchError, Result};

/// A link to run under: `None` is the namespace's loopback unlimited.
pub fn label(gbit: Option<f64>) -> String {
    match gbit {
        None => "unlimited".into(),
        Some(g) => format!("{g} Gbit/s"),
    }
}

/// Checks that this machine lets us make a network namespace and shape its loopback, with an
/// error saying what to change.
pub fn check_allowed() -> Result<()> {
    for tool in ["unshare", "ip", "tc"] {
        if which(tool).is_none() {
            return Err(BenchError::Setup(format!(
                "--link-gbit needs `{tool}` on PATH (util-linux's unshare, iproute2's ip and tc); \
                 install it or leave out --link-gbit"
            )));
        }
    }
    let probe = Command::new("unshare")
        .args(["--net", "--", "tc", "qdisc", "show", "dev", "lo"])
        .output()
        .map_err(io("running unshare --net"))?;
    if !probe.status.success() {
        return Err(BenchError::Setup(format!(
            "--link-gbit runs the cluster in a network namespace, and this machine refused one \
             (`unshare --net`: {}); run as root or with CAP_SYS_ADMIN and CAP_NET_ADMIN, or \
             leave out --link-gbit",
            String::from_utf8_lossy(&probe.stderr).trim()
        )));
    }
    Ok(())
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The `tc` token bucket for `gbit`: a burst of 10 ms at the rate (at least 256 KiB, above
/// the loopback's 64 KiB packets) and a queue of up to 50 ms, so TCP sees a link, not drops.
fn tbf_args(gbit: f64) -> Vec<String> {
    let bytes_per_s = gbit * 1e9 / 8.0;
    let burst = ((bytes_per_s / 100.0) as u64).max(256 * 1024);
    [
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "tbf",
        "rate",
        &format!("{}mbit", (gbit * 1000.0).round() as u64),
        "burst",
        &burst.to_string(),
        "latency",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs this binary with `args` in a fresh network namespace limited to `gbit` (unlimited
/// with `None`); its output passes through. Fails when the child fails.
pub fn run_inside(gbit: Option<f64>, args: &[String]) -> Result<()> {
    let exe = std::env::current_exe().map_err(io("finding the tessera binary"))?;
    // In the namespace: loopback up, the shaping, then this binary in place of the shell.
    let mut script = String::from("set -e; ip link set lo up; ");
    if let Some(g) = gbit {
        script.push_str(&format!("tc {}; ", tbf_args(g).join(" ")));
    }
    script.push_str("exec \"$@\"");
    let status = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", &script, "tessera-netns"])
        .arg(&exe)
        .args(args)
        .status()
        .map_err(io("running unshare --net"))?;
    if !status.success() {
        return Err(BenchError::Setup(format!(
            "the run on a {} link failed ({status}); its output is above",
            label(gbit)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_bucket_holds_ten_ms_at_the_rate() {
        let args = tbf_args(10.0);
        assert_eq!(args[7], "10000mbit");
        assert_eq!(args[9], "12500000");
        assert_eq!(tbf_args(0.1)[9], (256 * 1024).to_string());
        assert_eq!(label(Some(2.0)), "2 Gbit/s");
        assert_eq!(label(None), "unlimited");
    }
}
