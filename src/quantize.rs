//! `medvlm quantize`: a checkpoint becomes a quantized one (see
//! [`crate::model::quantized`]) that every inference command loads as it is, without the
//! dense weights ever being in memory: the file is written tensor by tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::kernels::quant::{QWeight, QuantKind};
use crate::model::{quantized, CheckpointWeights, Qwen2Vl, Qwen2VlConfig};

/// Writes `out` (which must not exist): the checkpoint `src` with its linear layers
/// quantized to `kind` (and the head to [`quantized::head_format`]'s), every other tensor as it is. Works
/// tensor by tensor from the files, so memory holds one weight in f32 at a time plus the
/// quantized model. Returns how many tensors were quantized.
pub fn save(src: &Path, kind: QuantKind, out: &Path) -> Result<usize> {
    if out.exists() {
        bail!(
            "--out {}: already exists; choose a new directory",
            out.display()
        );
    }
    if quantized::checkpoint_format(src)?.is_some() {
        bail!(
            "--model {}: already quantized; quantize the original checkpoint",
            src.display()
        );
    }
    let config = Qwen2VlConfig::from_file(&src.join("config.json"))?;
    let weights = CheckpointWeights::open(src)?;
    // Which tensors are linear weights: from a model built over the headers alone.
    let mut shapes = Qwen2Vl::over_headers(&weights, &config)?;
    let mut targets: HashMap<String, QuantKind> = shapes
        .linears_mut()
        .into_iter()
        .filter_map(|(_, l)| {
            let (_, k) = l.weight().dims2().ok()?;
            Some((format!("{}.weight", l.name()), kind.for_width(k)?))
        })
        .collect();
    let head = quantized::head_tensor(&weights, &config)?;
    if let Some(h) = quantized::head_format(kind).for_width(config.text.hidden_size) {
        targets.insert(head, h);
    }
    let reader = weights.reader()?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut manifest = quantized::Manifest {
        format: kind.name().into(),
        tensors: BTreeMap::new(),
    };
    let names: Vec<String> = weights.tensor_names().map(String::from).collect();
    let bar = indicatif::ProgressBar::new(names.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "quantize [{bar:30}] {pos}/{len} tensors  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for name in names {
        let t = reader.read(&name)?;
        let t = match targets.get(&name) {
            Some(&k) => {
                let (n, kk) = t.dims2()?;
                let w = t.to_dtype(DType::F32)?;
                let q = crate::kernels::with_f32(&w, |w| QWeight::quantize(k, w, n, kk))
                    .context("reading a weight")?;
                manifest.tensors.insert(name.clone(), k.name().into());
                let bytes = q.bytes().to_vec();
                let len = bytes.len();
                Tensor::from_vec(bytes, len, &Device::Cpu)?
            }
            None => t,
        };
        tensors.insert(name, t);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let staging = crate::files::Staging::beside(out, "quantize")?;
    let tmp = staging.path();
    std::fs::copy(src.join("config.json"), tmp.join("config.json"))
        .with_context(|| format!("{}: cannot copy", src.join("config.json").display()))?;
    crate::processor::copy_side_files(src, tmp)?;
    let wpath = tmp.join("model.safetensors");
    crate::files::save_safetensors(&tensors, &wpath)?;
    std::fs::File::open(&wpath)?.sync_all()?;
    crate::files::write_atomic(
        &tmp.join(quantized::MANIFEST),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    staging.commit(out)?;
    Ok(manifest.tensors.len())
}
