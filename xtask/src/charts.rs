//! SVG charts of a bench run, plain text a README can embed: every scenario's ratio to its
//! reference beside its goal, and the scaling table.

use std::fmt::Write as _;

use crate::bench::Dimension;

/// A goal on a ratio: at least, or at most, this much.
#[derive(Clone, Copy)]
pub(crate) enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    /// `ratio ≥ 0.7` or `ratio ≤ 1.2`; other goals are not ratios.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("ratio ")?;
        if let Some(value) = rest.strip_prefix("≥ ") {
            return value.trim().parse().ok().map(Self::AtLeast);
        }
        rest.strip_prefix("≤ ")?
            .trim()
            .parse()
            .ok()
            .map(Self::AtMost)
    }

    fn met(self, ratio: f64) -> bool {
        match self {
            Self::AtLeast(goal) => ratio >= goal,
            Self::AtMost(goal) => ratio <= goal,
        }
    }

    fn value(self) -> f64 {
        match self {
            Self::AtLeast(goal) | Self::AtMost(goal) => goal,
        }
    }
}

/// One bar of the ratio chart.
pub(crate) struct RatioBar {
    pub(crate) label: String,
    pub(crate) ratio: f64,
    pub(crate) goal: Option<Goal>,
}

const MET: &str = "#2e7d32";
const MISSED: &str = "#c62828";
const NO_GOAL: &str = "#78909c";
const FONT: &str = "font-family=\"system-ui,sans-serif\" font-size=\"12\"";
const TITLE: &str = "font-family=\"system-ui,sans-serif\" font-size=\"14\" font-weight=\"bold\"";

/// A figure a chart can place (a failed measurement draws as nothing).
fn finite(value: f64) -> f64 {
    if value.is_finite() { value } else { 0.0 }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Every scenario's ratio on a log scale (0.05× to 10×), with its goal marked: green when
/// met, red when missed, grey without a ratio goal.
pub(crate) fn ratios(title: &str, bars: &[RatioBar]) -> String {
    let (label_width, plot_width, row) = (420.0, 420.0, 22.0);
    let (low, high) = (0.05f64.ln(), 10f64.ln());
    let x = |ratio: f64| {
        label_width + (finite(ratio).clamp(0.05, 10.0).ln() - low) / (high - low) * plot_width
    };
    let height = 50.0 + row * bars.len() as f64 + 30.0;
    let width = label_width + plot_width + 90.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" {TITLE}>{}</text>\n",
        escape(title)
    );
    let bottom = 40.0 + row * bars.len() as f64;
    for tick in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0] {
        let tx = x(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{tx:.1}\" y1=\"34\" x2=\"{tx:.1}\" y2=\"{bottom}\" stroke=\"{}\" stroke-width=\"{}\"/>\n<text x=\"{tx:.1}\" y=\"{:.1}\" {FONT} text-anchor=\"middle\" fill=\"#555\">{tick}×</text>",
            if tick == 1.0 { "#888" } else { "#e0e0e0" },
            if tick == 1.0 { 1.5 } else { 1.0 },
            bottom + 16.0
        );
    }
    for (n, bar) in bars.iter().enumerate() {
        let y = 40.0 + row * n as f64;
        let colour = match bar.goal {
            Some(goal) if goal.met(bar.ratio) => MET,
            Some(_) => MISSED,
            None => NO_GOAL,
        };
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" {FONT} text-anchor=\"end\">{}</text>\n<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" {FONT}>{:.2}×</text>",
            label_width - 8.0,
            y + 14.0,
            escape(&bar.label),
            x(0.05),
            y + 3.0,
            (x(bar.ratio) - x(0.05)).max(1.0),
            row - 6.0,
            x(bar.ratio) + 4.0,
            y + 14.0,
            bar.ratio
        );
        if let Some(goal) = bar.goal {
            let gx = x(goal.value());
            let _ = writeln!(
                svg,
                "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>",
                y + 1.0,
                y + row - 1.0
            );
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{:.1}\" {FONT} fill=\"#555\">bar: value ÷ reference (log scale); black tick: the goal; green met, red missed, grey no ratio goal</text>\n</svg>",
        height - 6.0
    );
    svg
}

/// The scaling table: per kind of work, each size's cost per send as a multiple of the
/// smallest size's, with the 1.2× goal marked.
pub(crate) fn scaling(dimensions: &[Dimension]) -> String {
    let (label_width, plot_width, bar) = (300.0, 380.0, 16.0);
    let largest = dimensions
        .iter()
        .flat_map(|d| d.costs.iter().map(move |c| c / d.costs[0]))
        .fold(2.0f64, f64::max)
        .min(10.0);
    let x = |multiple: f64| label_width + finite(multiple).min(largest) / largest * plot_width;
    let rows: usize = dimensions.iter().map(|d| d.sizes.len() + 1).sum();
    let height = 50.0 + bar * rows as f64 + 30.0;
    let width = label_width + plot_width + 130.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" {TITLE}>Cost per send as the work grows (× the smallest size; goal ≤ 1.2×)</text>\n"
    );
    let bottom = 40.0 + bar * rows as f64;
    // The two ticks are close: one label left of its line, the other right of it.
    for (tick, colour, anchor, shift) in [(1.0, "#888", "end", -3.0), (1.2, "black", "start", 3.0)]
    {
        let tx = x(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{tx:.1}\" y1=\"34\" x2=\"{tx:.1}\" y2=\"{bottom}\" stroke=\"{colour}\" stroke-dasharray=\"4 3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" {FONT} text-anchor=\"{anchor}\">{tick}×</text>",
            tx + shift,
            bottom + 16.0
        );
    }
    let mut y = 40.0;
    for d in dimensions {
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.1}\" {FONT} font-weight=\"bold\">{}</text>",
            y + 12.0,
            escape(&d.name)
        );
        y += bar;
        for (size, cost) in d.sizes.iter().zip(&d.costs) {
            let multiple = cost / d.costs[0];
            let colour = if multiple <= 1.2 { MET } else { MISSED };
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" {FONT} text-anchor=\"end\">{size} {}</text>\n<rect x=\"{label_width}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" {FONT}>{multiple:.2}× ({:.1} µs)</text>",
                label_width - 8.0,
                y + 12.0,
                d.counted,
                y + 2.0,
                (x(multiple) - label_width).max(1.0),
                bar - 4.0,
                x(multiple) + 4.0,
                y + 12.0,
                cost / 1000.0
            );
            y += bar;
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{:.1}\" {FONT} fill=\"#555\">each bar: cost per send at that size ÷ cost at the smallest size of the same kind</text>\n</svg>",
        height - 6.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_parse_from_the_table_text() {
        assert!(matches!(Goal::parse("ratio ≥ 0.7"), Some(Goal::AtLeast(g)) if g == 0.7));
        assert!(matches!(Goal::parse("ratio ≤ 1.2"), Some(Goal::AtMost(g)) if g == 1.2));
        assert!(Goal::parse("p99 ≤ 50 ms").is_none());
        assert!(Goal::parse("—").is_none());
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let svg = ratios(
            "t",
            &[RatioBar {
                label: "a <b>".into(),
                ratio: 0.5,
                goal: Goal::parse("ratio ≥ 0.7"),
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt;") && svg.contains(MISSED));
        assert_attributes_once(&svg);
        let svg = scaling(&[Dimension {
            name: "d".into(),
            counted: "things",
            sizes: vec![1, 10],
            costs: vec![100.0, 110.0],
            cost_is: "",
        }]);
        assert!(svg.contains("1.10×") && svg.contains(MET));
        assert_attributes_once(&svg);
    }

    /// No element names an attribute twice (browsers refuse such a document).
    fn assert_attributes_once(svg: &str) {
        for tag in svg.split('<').skip(1) {
            let tag = tag.split('>').next().unwrap_or_default();
            let mut names: Vec<&str> = tag
                .split('"')
                .step_by(2)
                .filter_map(|part| part.trim_end().strip_suffix('='))
                .map(|part| part.rsplit(' ').next().unwrap_or_default())
                .collect();
            let count = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), count, "an attribute named twice in <{tag}>");
        }
    }
}
