//! Finding, validating and naming the safetensors weights of a checkpoint directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::Qwen2VlConfig;

/// Where the two towers live in the tensor names. Released checkpoints use `model.*` and
/// `visual.*`; transformers >= 4.52 can also write `model.language_model.*` and
/// `model.visual.*`. Both load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    Legacy,
    Nested,
}

impl WeightLayout {
    pub fn text_prefix(self) -> &'static str {
        match self {
            Self::Legacy => "model",
            Self::Nested => "model.language_model",
        }
    }
    pub fn vision_prefix(self) -> &'static str {
        match self {
            Self::Legacy => "visual",
            Self::Nested => "model.visual",
        }
    }

    /// transformers' current (>= 4.52) name of a module path written in either layout:
    /// `model.layers.3.mlp.up_proj` and `model.language_model.layers.3.mlp.up_proj` both
    /// give the latter, `visual.blocks.0.attn.qkv` gives `model.visual.blocks.0.attn.qkv`.
    /// This is how LoRA adapters name layers (PEFT keys follow the module tree).
    pub fn current_name(path: &str) -> String {
        let nested = Self::Nested;
        if path.starts_with(&format!("{}.", nested.text_prefix()))
            || path.starts_with(&format!("{}.", nested.vision_prefix()))
        {
            return path.to_string();
        }
        let legacy = Self::Legacy;
        if let Some(rest) = path.strip_prefix(&format!("{}.", legacy.vision_prefix())) {
            format!("{}.{rest}", nested.vision_prefix())
        } else if let Some(rest) = path.strip_prefix(&format!("{}.", legacy.text_prefix())) {
            format!("{}.{rest}", nested.text_prefix())
        } else {
            path.to_string()
        }
    }

    /// A module path in current naming ([`Self::current_name`]) as this layout writes it.
    pub fn local_name(self, module: &str) -> String {
        let nested = Self::Nested;
        if let Some(rest) = module.strip_prefix(&format!("{}.", nested.text_prefix())) {
            format!("{}.{rest}", self.text_prefix())
        } else if let Some(rest) = module.strip_prefix(&format!("{}.", nested.vision_prefix())) {
            format!("{}.{rest}", self.vision_prefix())
        } else {
            module.to_string()
        }
    }
}

/// The weight files of one checkpoint, opened and checked.
pub struct CheckpointWeights {
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// tensor name -> (dtype, shape)
    tensors: BTreeMap<String, (DType, Vec<usize>)>,
    /// The quantized tensors of a quantized checkpoint (see [`super::quantized`]), with
    /// their formats; empty for any other checkpoint.
    quantized: BTreeMap<String, crate::kernels::quant::QuantKind>,
}

impl CheckpointWeights {
    /// Finds the weights: the files named by `model.safetensors.index.json`, else
    /// `model.safetensors`, else every `*.safetensors` in the directory. Each file is opened
    /// and its header validated, so a truncated or corrupt file is named in the error.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: not a directory (expected a Hugging Face checkpoint directory)",
                dir.display()
            );
        }
        let files = find_files(dir)?;
        let mut tensors = BTreeMap::new();
        for f in &files {
            // An unreadable file is a permission (or I/O) problem, not a corrupt one.
            std::fs::File::open(f).map_err(|e| crate::files::io_error(f, "cannot read", e))?;
            // SAFETY: the file is only read; medvlm never writes a checkpoint in place.
            let st = unsafe { MmapedSafetensors::new(f) }
                .map_err(|e| anyhow!("{}: not a valid safetensors file ({e})", f.display()))?;
            for (name, view) in st.tensors() {
                let dtype = DType::try_from(view.dtype()).map_err(|e| {
                    anyhow!(
                        "{}: tensor {name} has an unsupported dtype ({e})",
                        f.display()
                    )
                })?;
                tensors.insert(name, (dtype, view.shape().to_vec()));
            }
        }
        let quantized = super::quantized::read_formats(dir)?;
        for name in quantized.keys() {
            if tensors
                .get(name)
                .is_none_or(|(dt, s)| *dt != DType::U8 || s.len() != 1)
            {
                bail!(
                    "{}: {} names {name}, which the weights do not hold as quantized bytes",
                    dir.display(),
                    super::quantized::MANIFEST
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            quantized,
        })
    }

    /// The quantized tensors and their formats (empty unless written by `medvlm quantize`).
    pub fn quantized(&self) -> &BTreeMap<String, crate::kernels::quant::QuantKind> {
        &self.quantized
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Which naming scheme these weights use.
    pub fn layout(&self, config: &Qwen2VlConfig) -> Result<WeightLayout> {
        let layout = if self
            .tensors
            .contains_key("model.language_model.embed_tokens.weight")
        {
            WeightLayout::Nested
        } else if self.tensors.contains_key("model.embed_tokens.weight") {
            WeightLayout::Legacy
        } else {
            bail!(
                "{}: the weights have no embed_tokens tensor; this does not look like a \
                 Qwen2-VL checkpoint",
                self.dir.display()
            );
        };
        if !config.text.tie_word_embeddings && !self.tensors.contains_key("lm_head.weight") {
            bail!(
                "{}: config.json says tie_word_embeddings = false but the weights have no \
                 lm_head.weight",
                self.dir.display()
            );
        }
        Ok(layout)
    }

    /// A variable source over the files, converting to `dtype` on read.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_backend(
            Box::new(self.reader()?),
            dtype,
            device.clone(),
        ))
    }

    /// Reads tensors one at a time from the files (see [`TensorReader`]).
    pub fn reader(&self) -> Result<TensorReader> {
        TensorReader::open(&self.files)
    }

    /// Wraps a model-building error (a missing tensor, a shape that disagrees with
    /// config.json) so it names the checkpoint.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{}: weights do not match config.json: {e:#}",
            self.dir.display()
        )
    }

    /// A variable source that checks every requested tensor's name and shape against the
    /// file headers without reading any weight data: building a model from it validates a
    /// checkpoint against its config in milliseconds, whatever its size.
    pub fn shape_checker(&self) -> VarBuilder<'static> {
        let backend = ShapeChecker {
            tensors: self.tensors.clone(),
            quantized: self.quantized.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu)
    }

    pub fn num_parameters(&self) -> usize {
        self.tensors
            .values()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// How many parameters are stored in each dtype.
    pub fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (dt, s) in self.tensors.values() {
            *out.entry(format!("{dt:?}").to_lowercase()).or_default() +=
                s.iter().product::<usize>();
        }
        out
    }

    /// The dtype that holds every stored float weight exactly: bf16 when all of them are
    /// bf16, else f32 (quantizing on load reads the weights in it, so that the result is
    /// the one `medvlm quantize` computes from the files).
    pub fn exact_float_dtype(&self) -> DType {
        let all_bf16 = self
            .tensors
            .values()
            .all(|(dt, _)| !dt.is_float() || *dt == DType::BF16);
        if all_bf16 {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// The dtype `name` is stored in, when the checkpoint has it.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|(dt, _)| *dt)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// `t` if it has the shape a layer asked for, else candle's usual shape-mismatch error: the
/// check every `SimpleBackend::get` makes.
pub(crate) fn expect_shape(t: Tensor, s: &Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.dims() != s.dims() {
        candle_core::bail!(
            "shape mismatch for {name}, expected {:?}, got {:?}",
            s.dims(),
            t.dims()
        );
    }
    Ok(t)
}

struct ShapeChecker {
    tensors: BTreeMap<String, (DType, Vec<usize>)>,
    quantized: BTreeMap<String, crate::kernels::quant::QuantKind>,
}

impl SimpleBackend for ShapeChecker {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(&kind) = self.quantized.get(name) {
            // Quantized bytes: their length must be what the requested shape takes.
            let (n, k) = s.dims2()?;
            let have = self.tensors.get(name).map_or(0, |(_, sh)| sh[0]);
            let want = crate::kernels::quant::QWeight::stored_len(kind, n, k);
            if !kind.fits(k) || have != want {
                candle_core::bail!(
                    "{name}: {have} bytes of {} weights, where a ({n}, {k}) weight takes {want}",
                    kind.name()
                );
            }
            return super::layers::placeholder(n, k, dtype);
        }
        expect_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((_, shape)) = self.tensors.get(name) else {
            candle_core::bail!("cannot find tensor {name}");
        };
        // A broadcast scalar has the right shape and allocates nothing.
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape.as_slice())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn find_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("{}: cannot read", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        for f in &files {
            if !f.is_file() {
                bail!(
                    "{}: weight file {} named in the index is missing",
                    index.display(),
                    f.display()
                );
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no *.safetensors weights found (medvlm reads safetensors checkpoints, not \
             pytorch_model.bin)",
            dir.display()
        );
    }
    Ok(files)
}

/// Reads named tensors from safetensors files with positioned reads, one tensor at a time.
///
/// Why not memory-map: pages of a mapped file that have been read count in the process's
/// resident memory until the mapping goes away, so loading a 4.4 GB bf16 checkpoint through
/// a mapping peaks at the file plus the loaded copy (about twice the model). Read into a
/// buffer, the file's pages stay in the page cache, which the kernel can reclaim, and the
/// peak is the model plus one tensor.
pub struct TensorReader {
    files: Vec<(PathBuf, std::fs::File, u64)>,
    /// name -> (file index, dtype, shape, byte range within the data section)
    tensors: BTreeMap<String, (usize, DType, Vec<usize>, std::ops::Range<u64>)>,
}

impl TensorReader {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let bad =
                |what: &str| anyhow!("{}: not a valid safetensors file ({what})", path.display());
            let file = std::fs::File::open(path)
                .map_err(|e| crate::files::io_error(path, "cannot read", e))?;
            let len = file
                .metadata()
                .with_context(|| format!("{}: cannot read its size", path.display()))?
                .len();
            let mut n = [0u8; 8];
            read_at(&file, &mut n, 0).map_err(|_| bad("shorter than its header"))?;
            let n = u64::from_le_bytes(n);
            if n > 100 << 20 || 8 + n > len {
                return Err(bad("header length out of range"));
            }
            let mut header = vec![0u8; n as usize];
            read_at(&file, &mut header, 8).map_err(|_| bad("cannot read the header"))?;
            let header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(&format!("header: {e}")))?;
            let data_start = 8 + n;
            for (name, info) in header {
                if name == "__metadata__" {
                    continue;
                }
                let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
                    Some("F32") => DType::F32,
                    Some("BF16") => DType::BF16,
                    Some("F16") => DType::F16,
                    Some("F64") => DType::F64,
                    Some("I64") => DType::I64,
                    Some("U32") => DType::U32,
                    Some("U8") => DType::U8,
                    other => {
                        return Err(bad(&format!(
                            "tensor {name} has unsupported dtype {other:?}"
                        )))
                    }
                };
                let shape: Vec<usize> = info
                    .get("shape")
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .ok_or_else(|| bad(&format!("tensor {name} has no shape")))?;
                let offs: [u64; 2] = info
                    .get("data_offsets")
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .ok_or_else(|| bad(&format!("tensor {name} has no data_offsets")))?;
                let want = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
                if offs[1] < offs[0] || offs[1] - offs[0] != want || data_start + offs[1] > len {
                    return Err(bad(&format!(
                        "tensor {name}'s bytes do not fit its shape or the file"
                    )));
                }
                tensors.insert(
                    name,
                    (fi, dtype, shape, data_start + offs[0]..data_start + offs[1]),
                );
            }
            files.push((path.clone(), file, len));
        }
        Ok(Self { files, tensors })
    }

    /// The tensor as stored, on the CPU.
    pub fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let Some((fi, dtype, shape, range)) = self.tensors.get(name) else {
            candle_core::bail!("cannot find tensor {name}");
        };
        let (path, file, _) = &self.files[*fi];
        let failed = |e: std::io::Error| {
            candle_core::Error::Msg(format!("{}: reading {name}: {e}", path.display()))
        };
        // Floats are read straight into the tensor's own buffer, on 2 MB pages where the OS
        // allows ([`crate::kernels::pages::vec_for_weights`]): decoding streams the weights
        // as they are stored (bf16 on AVX-512 BF16, f32 LM heads).
        fn direct<T: candle_core::WithDType>(
            file: &std::fs::File,
            at: u64,
            shape: &[usize],
        ) -> std::io::Result<Tensor> {
            let n: usize = shape.iter().product();
            let mut v = crate::kernels::pages::vec_for_weights::<T>(n);
            v.resize(n, T::zero());
            // SAFETY: n initialised values of a plain float type, viewed as their bytes;
            // any bytes are a valid value (safetensors stores them little-endian, as this
            // CPU does: checked by the caller).
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    v.as_mut_ptr() as *mut u8,
                    n * T::DTYPE.size_in_bytes(),
                )
            };
            read_at(file, bytes, at)?;
            Tensor::from_vec(v, shape, &Device::Cpu).map_err(std::io::Error::other)
        }
        if cfg!(target_endian = "little") {
            let t = match dtype {
                DType::BF16 => Some(direct::<half::bf16>(file, range.start, shape)),
                DType::F16 => Some(direct::<half::f16>(file, range.start, shape)),
                DType::F32 => Some(direct::<f32>(file, range.start, shape)),
                _ => None,
            };
            if let Some(t) = t {
                return t.map_err(failed);
            }
        }
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        read_at(file, &mut bytes, range.start).map_err(failed)?;
        Tensor::from_raw_buffer(&bytes, *dtype, shape, &Device::Cpu)
    }
}

fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

impl SimpleBackend for TensorReader {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        expect_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
