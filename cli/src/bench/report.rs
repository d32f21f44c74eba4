//! Bench records, the table, the JSON file, and peers' timings merged beside ours.

use super::suites::Case;
use super::Timing;
use bnorm::Device;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One measured case (the JSON record).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub op: String,
    pub dtype: String,
    pub layout: String,
    pub dims: Vec<usize>,
    pub ours_ms: f64,
    pub ours_min_ms: f64,
    pub reps: usize,
    /// (bytes of each tensor input read once + each output written once) / time.
    pub ours_gbps: f64,
    /// Plain copy of a buffer the size of x, same run (same cache regime).
    pub copy_gbps: f64,
    pub pct_copy: f64,
    /// Passes over the tensor of a streaming implementation (3 forward-train, 5 backward,
    /// 2 inference) and our time as a % of that roofline at the copy bandwidth.
    pub passes: usize,
    pub pct_roofline: f64,
    /// Where the working set lives: L2, L3 or DRAM.
    pub regime: String,
    /// `<peer>_ms` for each peer that has this case.
    #[serde(flatten)]
    pub peers: BTreeMap<String, f64>,
    /// What a runner's in-process peer adds (e.g. `cudnn_modes`, `cudnn_check`); no key
    /// ends in `_ms` (`bnorm chart` takes those for peers).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

type PeerKey = (String, String, String, Vec<usize>);

/// A peer's timings by case.
pub struct Peer {
    pub name: String,
    pub times: HashMap<PeerKey, f64>,
}

#[derive(Deserialize)]
struct PeerFile {
    records: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Load `NAME=FILE` peer files.
pub fn load_peers(specs: &[String]) -> Result<Vec<Peer>, String> {
    specs
        .iter()
        .map(|s| {
            let (name, file) = s.split_once('=').ok_or_else(|| format!("--peer-json expects NAME=FILE, got `{s}`"))?;
            let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
            let pf: PeerFile = serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
            let field = format!("{name}_ms");
            let mut times = HashMap::new();
            for r in pf.records {
                let get = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                let dims: Vec<usize> = r
                    .get("dims")
                    .and_then(|d| d.as_array())
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect())
                    .unwrap_or_default();
                if let Some(ms) = r.get(&field).and_then(|v| v.as_f64()) {
                    times.insert((get("op"), get("dtype"), get("layout"), dims), ms);
                }
            }
            if times.is_empty() {
                return Err(format!("{file}: no record carries `{field}`"));
            }
            Ok(Peer { name: name.to_string(), times })
        })
        .collect()
}

fn cache_bytes(index: u32) -> Option<usize> {
    let s = std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{index}/size")).ok()?;
    let s = s.trim();
    let (num, mult) = match s.strip_suffix('K') {
        Some(n) => (n, 1024),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1 << 20),
            None => (s, 1),
        },
    };
    num.parse::<usize>().ok().map(|v| v * mult)
}

/// Where a working set of this many bytes lives on this machine's CPU: L2, L3 or DRAM.
pub fn cpu_regime(working_set: usize) -> &'static str {
    let l2 = cache_bytes(2).unwrap_or(1 << 20);
    let l3 = cache_bytes(3).unwrap_or(32 << 20);
    if working_set <= l2 {
        "L2"
    } else if working_set <= l3 * 3 / 4 {
        "L3"
    } else {
        "DRAM"
    }
}

impl Record {
    /// `regime` says where the working set lives (the runner knows its caches).
    pub fn new(case: &Case, t: Timing, copy_gbps: f64, regime: &str, peers: &[Peer]) -> Record {
        let x_bytes = case.numel() * case.dtype.size();
        let secs = t.median_ms * 1e-3;
        let ours_gbps = case.bytes() as f64 / secs / 1e9;
        let roofline_secs = case.op.passes() as f64 * x_bytes as f64 / (copy_gbps * 1e9);
        let key: PeerKey =
            (case.op.name().into(), case.dtype.name().into(), case.layout.short().into(), case.dims.clone());
        let peers = peers.iter().filter_map(|p| p.times.get(&key).map(|&ms| (format!("{}_ms", p.name), ms))).collect();
        Record {
            op: case.op.name().into(),
            dtype: case.dtype.name().into(),
            layout: case.layout.short().into(),
            dims: case.dims.clone(),
            ours_ms: t.median_ms,
            ours_min_ms: t.min_ms,
            reps: t.reps,
            ours_gbps,
            copy_gbps,
            pct_copy: 100.0 * ours_gbps / copy_gbps,
            passes: case.op.passes(),
            pct_roofline: 100.0 * roofline_secs / secs,
            regime: regime.into(),
            peers,
            extra: serde_json::Map::new(),
        }
    }
}

/// Run-wide facts printed above the table and stored in the JSON.
#[derive(Debug, Serialize)]
pub struct Meta {
    pub date: String,
    pub bnorm_version: String,
    pub device: String,
    pub device_reason: String,
    pub cpu_model: String,
    pub suite: String,
    pub batches: Vec<usize>,
    /// A plain copy of `copy_big_bytes` (256 MiB on the CPU, 1 GiB on a GPU), same run.
    pub copy_gbps_big: f64,
    pub copy_big_bytes: usize,
    pub timing: String,
    /// What the runner adds (GPU, driver, cuDNN version, the timing method in detail).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Meta {
    pub fn collect(dev: &Device, copy_big: f64, copy_big_bytes: usize, suite: &str, batches: &[usize]) -> Meta {
        let date = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%dT%H:%M:%SZ")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l[l.find(':').unwrap_or(0) + 1..].trim().to_string())
            })
            .unwrap_or_default();
        Meta {
            date,
            bnorm_version: env!("CARGO_PKG_VERSION").into(),
            device: dev.to_string(),
            device_reason: dev.reason().into(),
            cpu_model,
            suite: suite.into(),
            batches: batches.to_vec(),
            copy_gbps_big: copy_big,
            copy_big_bytes,
            timing: "median of >= reps calls after warm-up; wall clock (CPU) or CUDA events (GPU)".into(),
            extra: serde_json::Map::new(),
        }
    }
}

fn geomean(v: &[f64]) -> f64 {
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

pub fn print_table(meta: &Meta, records: &[Record]) {
    println!("bnorm bench  {}  {}  device {}", meta.date, meta.cpu_model, meta.device);
    println!(
        "plain copy ({} MiB): {:.1} GB/s; %copy uses a copy of x's size in the same run",
        meta.copy_big_bytes >> 20,
        meta.copy_gbps_big
    );
    let peer_names: Vec<String> = {
        let mut v: Vec<String> = records.iter().flat_map(|r| r.peers.keys().cloned()).collect();
        v.sort();
        v.dedup();
        v
    };
    let mut head = format!(
        "{:<14} {:<5} {:<3} {:<16} {:>9} {:>7} {:>6} {:>6} {:<5}",
        "op", "dtype", "lay", "dims", "ms", "GB/s", "%copy", "%roof", "where"
    );
    for p in &peer_names {
        head.push_str(&format!(" {:>10} {:>7}", p, "speedup"));
    }
    println!("{head}");
    for r in records {
        let dims = r.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let mut line = format!(
            "{:<14} {:<5} {:<3} {:<16} {:>9.4} {:>7.1} {:>6.1} {:>6.1} {:<5}",
            r.op, r.dtype, r.layout, dims, r.ours_ms, r.ours_gbps, r.pct_copy, r.pct_roofline, r.regime
        );
        for p in &peer_names {
            match r.peers.get(p) {
                Some(ms) => line.push_str(&format!(" {:>10.4} {:>6.2}x", ms, ms / r.ours_ms)),
                None => line.push_str(&format!(" {:>10} {:>7}", "-", "-")),
            }
        }
        println!("{line}");
    }
    // summaries per op / dtype / layout
    let mut groups: BTreeMap<(String, String, String), Vec<&Record>> = BTreeMap::new();
    for r in records {
        groups.entry((r.op.clone(), r.dtype.clone(), r.layout.clone())).or_default().push(r);
    }
    println!("summary (geometric means)");
    for ((op, dt, ly), rs) in &groups {
        let roof = geomean(&rs.iter().map(|r| r.pct_roofline).collect::<Vec<_>>());
        let mut line = format!("  {op:<14} {dt:<5} {ly:<3} {:>3} cases  %roofline {roof:>6.1}", rs.len());
        for p in &peer_names {
            let s: Vec<f64> = rs.iter().filter_map(|r| r.peers.get(p).map(|ms| ms / r.ours_ms)).collect();
            if !s.is_empty() {
                let min = s.iter().cloned().fold(f64::INFINITY, f64::min);
                line.push_str(&format!("  vs {p}: {:.2}x (min {:.2}x)", geomean(&s), min));
            }
        }
        println!("{line}");
    }
}

/// For every `<name>_check` object in the records' extras (e.g. `cudnn_check`, our
/// outputs against cuDNN's): the largest value of each numeric field over the cases, with
/// the case it came from.
pub fn print_checks(records: &[Record]) {
    let mut worst: BTreeMap<(String, String), (f64, String)> = BTreeMap::new();
    let mut cases: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        for (k, v) in &r.extra {
            let Some(obj) = v.as_object().filter(|_| k.ends_with("_check")) else { continue };
            *cases.entry(k.clone()).or_default() += 1;
            for (f, x) in obj {
                let Some(x) = x.as_f64() else { continue };
                let label = format!("{} {} {} {}", r.op, r.dtype, r.layout, dims_str(&r.dims));
                let e = worst.entry((k.clone(), f.clone())).or_insert((f64::NEG_INFINITY, String::new()));
                if x > e.0 || x.is_nan() {
                    *e = (x, label);
                }
            }
        }
    }
    for (check, n) in &cases {
        println!("{check}: largest over {n} cases");
        for ((c, field), (v, label)) in &worst {
            if c == check {
                println!("  {field:<24} {v:>11.3e}  ({label})");
            }
        }
    }
}

fn dims_str(d: &[usize]) -> String {
    d.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("x")
}

pub fn write_json(path: &Path, meta: &Meta, records: &[Record]) -> Result<(), String> {
    #[derive(Serialize)]
    struct Out<'a> {
        meta: &'a Meta,
        records: &'a [Record],
    }
    let s = serde_json::to_string_pretty(&Out { meta, records }).map_err(|e| e.to_string())?;
    std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}
