//! `bnorm chart`: speedup per shape against each peer, one panel per op, as SVG.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ChartArgs {
    /// A JSON file written by `bnorm bench --json` (with peers merged).
    #[arg(long)]
    json: PathBuf,
    /// Where to write the SVG.
    #[arg(long)]
    svg: PathBuf,
    /// Title above the panels.
    #[arg(long, default_value = "bnorm speedup (peer time / bnorm time; > 1 means bnorm is faster)")]
    title: String,
}

pub fn run(a: &ChartArgs) -> Result<ExitCode, String> {
    let text = std::fs::read_to_string(&a.json).map_err(|e| format!("{}: {e}", a.json.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", a.json.display()))?;
    let records = v.get("records").and_then(|r| r.as_array()).ok_or("no `records` array")?;
    render(records, &a.svg, &a.title)?;
    eprintln!("wrote {}", a.svg.display());
    Ok(ExitCode::SUCCESS)
}

/// One bar group: a case and its speedup against each peer.
struct Bar {
    label: String,
    speedups: Vec<Option<f64>>,
}

/// Render the records (bench JSON records, each with `ours_ms` and `<peer>_ms` fields).
pub fn render(records: &[Value], out: &Path, title: &str) -> Result<(), String> {
    let mut peers: Vec<String> = records
        .iter()
        .filter_map(|r| r.as_object())
        .flat_map(|o| o.keys().filter(|k| k.ends_with("_ms") && *k != "ours_ms" && *k != "ours_min_ms").cloned())
        .collect();
    peers.sort();
    peers.dedup();
    if peers.is_empty() {
        return Err("the records carry no peer timings (`<peer>_ms`); run bench with --peer-json".into());
    }
    let ops = ["forward_train", "inference", "backward"];
    let panels: Vec<(&str, Vec<Bar>)> = ops
        .iter()
        .map(|op| {
            let bars = records
                .iter()
                .filter(|r| r.get("op").and_then(|v| v.as_str()) == Some(op))
                .filter_map(|r| {
                    let ours = r.get("ours_ms")?.as_f64()?;
                    let dims: Vec<String> =
                        r.get("dims")?.as_array()?.iter().map(|d| d.as_u64().unwrap_or(0).to_string()).collect();
                    let label =
                        format!("{} {} {}", dims.join("x"), r.get("dtype")?.as_str()?, r.get("layout")?.as_str()?);
                    let speedups = peers.iter().map(|p| r.get(p).and_then(|v| v.as_f64()).map(|t| t / ours)).collect();
                    Some(Bar { label, speedups })
                })
                .collect();
            (*op, bars)
        })
        .filter(|(_, b): &(&str, Vec<Bar>)| !b.is_empty())
        .collect();
    let widest = panels.iter().map(|(_, b)| b.len()).max().unwrap_or(1);
    let width = (140 + widest * 16 * peers.len().max(1)).max(900) as u32;
    let height = 60 + 420 * panels.len() as u32;
    let root = SVGBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, rest) = root.split_vertically(50);
    top.draw(&Text::new(title.to_string(), (20, 15), ("sans-serif", 20).into_font())).map_err(|e| e.to_string())?;
    let areas = rest.split_evenly((panels.len(), 1));
    let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];
    for ((op, bars), area) in panels.iter().zip(areas) {
        // Logarithmic axis: peers differ by orders of magnitude (candle ~100x, PyTorch ~1-3x)
        // and a ratio of 0.8 must stay as visible as one of 1.25.
        let all = || bars.iter().flat_map(|b| b.speedups.iter().flatten()).cloned();
        let ymax = all().fold(1.0f64, f64::max) * 1.3;
        let ymin = all().fold(1.0f64, f64::min) * 0.75;
        let n = bars.len() as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(*op, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(150)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n, (ymin..ymax).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc("speedup (log scale)")
            .draw()
            .map_err(|e| e.to_string())?;
        let w = 0.8 / peers.len() as f64;
        for (i, b) in bars.iter().enumerate() {
            for (j, s) in b.speedups.iter().enumerate() {
                if let Some(s) = s {
                    let x0 = i as f64 + 0.1 + j as f64 * w;
                    let c = colors[j % colors.len()];
                    chart
                        .draw_series(std::iter::once(Rectangle::new([(x0, ymin), (x0 + w, *s)], c.filled())))
                        .map_err(|e| e.to_string())?;
                }
            }
            let style = TextStyle::from(("sans-serif", 10).into_font())
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Right, VPos::Center));
            chart
                .draw_series(std::iter::once(Text::new(b.label.clone(), (i as f64 + 0.5, ymin * 0.97), style)))
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(vec![(0.0, 1.0), (n, 1.0)], BLACK.stroke_width(1)))
            .map_err(|e| e.to_string())?
            .label("1.0 = parity")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK));
        for (j, p) in peers.iter().enumerate() {
            let c = colors[j % colors.len()];
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                .map_err(|e| e.to_string())?
                .label(format!("vs {}", p.trim_end_matches("_ms")))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
