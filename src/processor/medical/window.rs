//! From grey values (after the modality LUT) to 8-bit levels: the VOI LUT functions of DICOM
//! PS3.3 C.11.2.1.2 and the one rounding rule shared by DICOM and NIfTI.
//!
//! Every grey value `x` first becomes `t` in `0..=1`:
//!
//! - `LINEAR` (the default, and always the function of a window given in
//!   [`MedicalOptions`](super::MedicalOptions)): `x <= c - 0.5 - (w - 1) / 2` gives 0,
//!   `x > c - 0.5 + (w - 1) / 2` gives 1, and in between `t = (x - (c - 0.5)) / (w - 1) + 0.5`
//!   (for `w == 1`, a step at `c - 0.5`);
//! - `LINEAR_EXACT`: `t = clip((x - c) / w + 0.5, 0, 1)`;
//! - `SIGMOID`: `t = 1 / (1 + exp(-4 (x - c) / w))`;
//! - no window at all: `t = (x - min) / (max - min)` over the image's finite values (0 when
//!   `max == min`).
//!
//! Then `v = floor(t * 255 + 0.5)`: rounding half up, NaN to 0. pydicom's `apply_windowing`
//! maps to the data's output range `y_min..y_max` instead of `0..1`; the fixture script divides
//! that out, so the two agree up to floating-point noise.

use anyhow::{bail, Result};

/// A DICOM VOI LUT Function (0028,1056).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

impl VoiFunction {
    /// The function named by a VOI LUT Function value; `None` for an unknown name.
    pub fn from_dicom(name: &str) -> Option<Self> {
        match name.trim().to_ascii_uppercase().as_str() {
            "" | "LINEAR" => Some(Self::Linear),
            "LINEAR_EXACT" => Some(Self::LinearExact),
            "SIGMOID" => Some(Self::Sigmoid),
            _ => None,
        }
    }
}

/// A VOI window: centre, width and function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
    pub function: VoiFunction,
}

impl Window {
    /// A window a user asked for: always `LINEAR`, width at least 1 (PS3.3 C.11.2.1.2.1).
    pub fn user(center: f64, width: f64) -> Result<Self> {
        if !center.is_finite() || !width.is_finite() || width < 1.0 {
            bail!("invalid window (centre {center}, width {width}): the width must be at least 1");
        }
        Ok(Self {
            center,
            width,
            function: VoiFunction::Linear,
        })
    }

    /// A window found in a file, or `None` when the standard forbids its values (then the
    /// image's min..max is used instead).
    pub fn from_file(center: f64, width: f64, function: VoiFunction) -> Option<Self> {
        let valid = center.is_finite()
            && width.is_finite()
            && match function {
                VoiFunction::Linear => width >= 1.0,
                VoiFunction::LinearExact | VoiFunction::Sigmoid => width > 0.0,
            };
        valid.then_some(Self {
            center,
            width,
            function,
        })
    }

    /// `x` mapped to `0..=1` (NaN stays NaN).
    pub fn unit(&self, x: f64) -> f64 {
        let (c, w) = (self.center, self.width);
        match self.function {
            VoiFunction::Linear => {
                let c = c - 0.5;
                if w <= 1.0 {
                    return if x <= c { 0.0 } else { 1.0 };
                }
                let w = w - 1.0;
                if x <= c - w / 2.0 {
                    0.0
                } else if x > c + w / 2.0 {
                    1.0
                } else {
                    (x - c) / w + 0.5
                }
            }
            VoiFunction::LinearExact => {
                if x <= c - w / 2.0 {
                    0.0
                } else if x > c + w / 2.0 {
                    1.0
                } else {
                    (x - c) / w + 0.5
                }
            }
            VoiFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (x - c) / w).exp()),
        }
    }
}

/// `t` in `0..=1` to an 8-bit level, rounding half up; NaN becomes 0.
pub fn level(t: f64) -> u8 {
    if t.is_nan() {
        return 0;
    }
    (t.clamp(0.0, 1.0) * 255.0 + 0.5).floor() as u8
}

/// Grey values to 8-bit levels through `window`, or through the values' own finite
/// min..max when there is none; `invert` (MONOCHROME1) flips the result.
pub fn to_levels(values: &[f64], window: Option<&Window>, invert: bool) -> Vec<u8> {
    let flip = |v: u8| if invert { 255 - v } else { v };
    match window {
        Some(win) => values.iter().map(|&x| flip(level(win.unit(x)))).collect(),
        None => {
            let (lo, hi) = finite_range(values).unwrap_or((0.0, 0.0));
            values
                .iter()
                .map(|&x| {
                    let t = if hi > lo { (x - lo) / (hi - lo) } else { 0.0 };
                    flip(level(t))
                })
                .collect()
        }
    }
}

/// Smallest and largest finite value, or `None` when there is none.
pub fn finite_range(values: &[f64]) -> Option<(f64, f64)> {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, &v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// Common CT windows (centre, width) in Hounsfield units, as radiology references list them.
pub const WINDOW_PRESETS: &[(&str, (f64, f64))] = &[
    ("brain", (40.0, 80.0)),
    ("subdural", (80.0, 200.0)),
    ("stroke", (40.0, 40.0)),
    ("lung", (-600.0, 1500.0)),
    ("mediastinum", (50.0, 350.0)),
    ("abdomen", (40.0, 400.0)),
    ("liver", (60.0, 160.0)),
    ("bone", (400.0, 1800.0)),
];

/// A window as users write it (`--window`, the server's `"window"`): "CENTER,WIDTH" or a
/// preset name.
pub fn parse_window(s: &str) -> std::result::Result<(f64, f64), String> {
    let key = s.trim().to_ascii_lowercase();
    if let Some((_, w)) = WINDOW_PRESETS.iter().find(|(n, _)| *n == key) {
        return Ok(*w);
    }
    let names: Vec<&str> = WINDOW_PRESETS.iter().map(|(n, _)| *n).collect();
    let bad = || {
        format!(
            "expected CENTER,WIDTH (e.g. -600,1500) or one of {}, got {s:?}",
            names.join(", ")
        )
    };
    let (c, w) = s.split_once(',').ok_or_else(bad)?;
    let c: f64 = c.trim().parse().map_err(|_| bad())?;
    let w: f64 = w.trim().parse().map_err(|_| bad())?;
    if !c.is_finite() || !w.is_finite() || w < 1.0 {
        return Err(format!(
            "the window width must be at least 1 and both numbers finite, got {s:?}"
        ));
    }
    Ok((c, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_follows_the_standard() {
        // c = 40, w = 400: x <= 39.5 - 199.5 = -160 -> 0, x > 39.5 + 199.5 = 239 -> 1.
        let w = Window::user(40.0, 400.0).expect("window");
        assert_eq!(w.unit(-160.0), 0.0);
        assert!(w.unit(-159.5) > 0.0);
        assert_eq!(w.unit(-1000.0), 0.0);
        assert_eq!(w.unit(239.0), 1.0);
        assert_eq!(w.unit(240.0), 1.0);
        assert!((w.unit(39.5) - 0.5).abs() < 1e-12);
        assert_eq!(level(w.unit(39.5)), 128); // 127.5 rounds up
        let step = Window::user(10.0, 1.0).expect("window");
        assert_eq!(step.unit(9.5), 0.0);
        assert_eq!(step.unit(9.6), 1.0);
        assert!(Window::user(10.0, 0.5).is_err());
        assert!(Window::user(f64::NAN, 10.0).is_err());
    }

    #[test]
    fn other_functions_and_rounding() {
        let exact = Window::from_file(100.0, 50.0, VoiFunction::LinearExact).expect("window");
        assert_eq!(exact.unit(75.0), 0.0);
        assert_eq!(exact.unit(100.0), 0.5);
        assert_eq!(exact.unit(125.5), 1.0);
        let sig = Window::from_file(100.0, 50.0, VoiFunction::Sigmoid).expect("window");
        assert_eq!(sig.unit(100.0), 0.5);
        assert!(Window::from_file(0.0, 0.5, VoiFunction::Linear).is_none());
        assert_eq!(level(f64::NAN), 0);
        assert_eq!(level(-3.0), 0);
        assert_eq!(level(2.0), 255);
        assert_eq!(level(0.5 / 255.0), 1);
    }

    #[test]
    fn min_max_and_inversion() {
        let v = [f64::NAN, 10.0, 20.0, 15.0, f64::INFINITY];
        assert_eq!(to_levels(&v, None, false), vec![0, 0, 255, 128, 255]);
        assert_eq!(to_levels(&v, None, true), vec![255, 255, 0, 127, 0]);
        assert_eq!(to_levels(&[5.0, 5.0], None, false), vec![0, 0]);
    }
}
