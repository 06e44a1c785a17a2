//! `--plot`: the latency distribution as a percentile plot in plain SVG.
//!
//! The x axis is logarithmic in 1/(1-p), as HdrHistogram's plotter draws it, so the
//! tail (99 %, 99.9 %, …) gets as much room as the median; the y axis is linear
//! latency. Hand-written SVG keeps the binary free of a plotting stack.

use std::fmt::Write;

use super::Report;

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// The plot of `report`'s latency histogram as an SVG document.
pub(crate) fn svg(report: &Report) -> String {
    let h = &report.histogram;
    // Decades of the x axis: as many nines as the sample count can resolve.
    let decades = if h.len() > 1 {
        (h.len() as f64).log10().ceil().clamp(1.0, 6.0)
    } else {
        1.0
    };
    let points: Vec<(f64, f64)> = (0..=(decades * 50.0) as usize)
        .map(|i| {
            let x = i as f64 / 50.0;
            let q = 1.0 - 10f64.powf(-x);
            let v = if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1e3
            };
            (x, v)
        })
        .collect();
    let y_max = points
        .iter()
        .map(|p| p.1)
        .fold(1.0, f64::max)
        .max(report.latency_us.max)
        * 1.05;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / decades * plot_w;
    let sy = |y: f64| TOP + plot_h - y / y_max * plot_h;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        out,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">echod bench: {} → {}, \
         {} connections, {} B, {} echoes</text>",
        WIDTH / 2.0,
        report.mode.label(),
        report.target,
        report.connections,
        report.size,
        report.tally.messages
    );
    for d in 0..=decades as usize {
        let x = sx(d as f64);
        let label = match d {
            0 => "0%".to_string(),
            _ => format!("{}%", 100.0 - 100.0 * 10f64.powi(-(d as i32))),
        };
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    for i in 0..=5 {
        let v = y_max * i as f64 / 5.0;
        let y = sy(v);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|&(x, v)| format!("{:.1},{:.1}", sx(x), sy(v)))
        .collect();
    let _ = writeln!(
        out,
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>",
        path.join(" ")
    );
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\n\
         <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">latency (µs)</text>\n</svg>",
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0,
        TOP + plot_h / 2.0
    );
    out
}
