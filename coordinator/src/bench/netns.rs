//! `bench scale --link-gbit`: a run inside its own network namespace whose loopback is
//! rate-limited, so the whole loopback cluster (Redis, the coordinator, the workers) talks over
//! a link of a given speed. The namespace is made with `unshare --net`, its loopback brought up
//! with `ip` and limited with a token bucket (`tc qdisc … tbf`); it disappears with the last
//! process inside it, so nothing is left behind on the host.
//!
//! Every packet on a loopback crosses it once, so the limit caps the sum of all the cluster's
//! traffic — about what one Redis node on a full-duplex link of half that speed moves in and
//! out.
//!
//! `--link-per-node` instead gives each Redis node a link of its own ([`limit_ports`]): an HTB
//! class per node's port carries that node's traffic in and out, as a Redis node on its own host
//! has, and the rest of the loopback is not limited. A sharded store then has the links of all
//! its shards, which one shared loopback cannot show.

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

/// A link of `gbit` as `tc` takes it: the rate in mbit, and a burst of 10 ms at the rate (at
/// least 256 KiB, above the loopback's 64 KiB packets) in bytes.
fn rate_and_burst(gbit: f64) -> (String, u64) {
    let bytes_per_s = gbit * 1e9 / 8.0;
    let burst = ((bytes_per_s / 100.0) as u64).max(256 * 1024);
    (format!("{}mbit", (gbit * 1000.0).round() as u64), burst)
}

/// The `tc` token bucket for `gbit` ([`rate_and_burst`]) with a queue of up to 50 ms, so TCP
/// sees a link, not drops.
fn tbf_args(gbit: f64) -> Vec<String> {
    let (rate, burst) = rate_and_burst(gbit);
    [
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "tbf",
        "rate",
        &rate,
        "burst",
        &burst.to_string(),
        "latency",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// [`label`] of a run where each Redis node has a link of its own.
pub fn label_per_node(gbit: Option<f64>) -> String {
    match gbit {
        None => "unlimited".into(),
        Some(g) => format!("{g} Gbit/s per Redis node"),
    }
}

/// The `tc` commands giving each of `ports` its own link of `gbit`: an HTB root whose
/// unclassified packets pass unlimited, one class per port at the rate (the token bucket's
/// burst), and filters sending the packets from and to that port into its class.
fn htb_commands(gbit: f64, ports: &[u16]) -> Vec<Vec<String>> {
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let (mbit, burst) = rate_and_burst(gbit);
    let mut cmds = vec![words("qdisc add dev lo root handle 1: htb")];
    for (i, port) in ports.iter().enumerate() {
        let class = format!("1:{:x}", 16 + i);
        cmds.push(words(&format!(
            "class add dev lo parent 1: classid {class} htb rate {mbit} ceil {mbit} \
             burst {burst} cburst {burst}"
        )));
        for side in ["sport", "dport"] {
            cmds.push(words(&format!(
                "filter add dev lo parent 1: protocol ip prio 1 u32 match ip {side} {port} \
                 0xffff flowid {class}"
            )));
        }
    }
    cmds
}

/// Gives each of `ports` (the store's nodes) its own link of `gbit` on this namespace's
/// loopback, replacing the previous run's. Refused outside a namespace of our own: it would
/// shape the host's loopback.
pub fn limit_ports(gbit: f64, ports: &[u16]) -> Result<()> {
    // The child of `run_inside` runs in a namespace its parent (the benchmark) is not in.
    let ns = |p: &str| std::fs::read_link(p).ok();
    let parent = std::os::unix::process::parent_id();
    let (own, outside) = (
        ns("/proc/self/ns/net"),
        ns(&format!("/proc/{parent}/ns/net")),
    );
    if own.is_none() || outside.is_none() || own == outside {
        return Err(BenchError::Setup(
            "a per-node link is only set inside the benchmark's own network namespace; use \
             --link-gbit with --link-per-node"
                .into(),
        ));
    }
    // Nothing to delete before the first run: the error is expected then.
    let _ = Command::new("tc")
        .args(["qdisc", "del", "dev", "lo", "root"])
        .output();
    for args in htb_commands(gbit, ports) {
        let out = Command::new("tc")
            .args(&args)
            .output()
            .map_err(io("running tc"))?;
        if !out.status.success() {
            return Err(BenchError::Setup(format!(
                "`tc {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
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
        assert_eq!(label_per_node(Some(2.0)), "2 Gbit/s per Redis node");
    }

    #[test]
    fn each_port_gets_a_class_and_both_directions_go_into_it() {
        let cmds = htb_commands(2.0, &[7000, 7001]);
        assert_eq!(cmds.len(), 1 + 2 * 3);
        assert_eq!(cmds[0].join(" "), "qdisc add dev lo root handle 1: htb");
        assert_eq!(
            cmds[1].join(" "),
            "class add dev lo parent 1: classid 1:10 htb rate 2000mbit ceil 2000mbit \
             burst 2500000 cburst 2500000"
        );
        assert!(cmds[2]
            .join(" ")
            .ends_with("match ip sport 7000 0xffff flowid 1:10"));
        assert!(cmds[3]
            .join(" ")
            .ends_with("match ip dport 7000 0xffff flowid 1:10"));
        assert!(cmds[6]
            .join(" ")
            .ends_with("match ip dport 7001 0xffff flowid 1:11"));
    }

    #[test]
    fn ports_are_not_shaped_on_the_hosts_own_network() {
        // The test runs in its parent's (cargo's) namespace: refused.
        let err = limit_ports(2.0, &[7000]).unwrap_err().to_string();
        assert!(err.contains("--link-per-node"), "{err}");
    }
}
