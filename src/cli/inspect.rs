//! `medvlm inspect`: what a checkpoint directory holds and the defaults it relies on.

use super::*;

pub(super) fn run_inspect(a: InspectArgs) -> Result<()> {
    let dir: &Path = &a.model;
    let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
    let weights = CheckpointWeights::open(dir)?;
    let layout = weights.layout(&config)?;
    // Build the model against the file headers alone, so a checkpoint that does not match its
    // config is reported here rather than at first use, without reading gigabytes.
    Qwen2Vl::over_headers(&weights, &config)?;
    // A quantized checkpoint stores bytes, not parameters: count them from the config.
    let quantized = crate::model::quantized::checkpoint_format(dir)?;
    let params = if quantized.is_some() {
        crate::model::num_parameters(&config)?
    } else {
        weights.num_parameters()
    };
    let dtypes = weights.dtype_counts();
    let proc = Processor::from_dir(dir, &ProcessorOptions::default())?;
    let ipc = &proc.images.config;
    // The head's stored format (the embedding table's when tied).
    let head_format = crate::model::quantized::head_tensor(&weights, &config)
        .ok()
        .and_then(|name| weights.quantized().get(&name).copied());
    if a.json {
        let j = json!({
            "model_type": config.arch.model_type(),
            "architecture": config.arch.name(),
            "parameters": params,
            "stored_dtypes": dtypes,
            "config_dtype": config.saved_dtype,
            "quantized": quantized.map(|q| json!({
                "format": q.name(),
                "head": head_format.map(|h| h.name()),
                "tensors": weights.quantized().len(),
                // Which of the (same-numbered) kernels products run on, on this machine.
                "kernel": crate::kernels::quant::kernel().name(),
            })),
            "text": {
                "layers": config.text.num_hidden_layers,
                "hidden_size": config.text.hidden_size,
                "heads": config.text.num_attention_heads,
                "kv_heads": config.text.num_key_value_heads,
                "intermediate_size": config.text.intermediate_size,
                "vocab_size": config.text.vocab_size,
                "head_dim": config.text.head_dim,
                "mrope_section": config.text.mrope_section,
                "mrope_interleaved": config.text.mrope_interleaved,
                "qk_norm": config.text.qk_norm,
                "rope_theta": config.text.rope_theta,
                "tie_word_embeddings": config.text.tie_word_embeddings,
            },
            "vision": {
                "depth": config.vision.depth,
                "embed_dim": config.vision.embed_dim,
                "heads": config.vision.num_heads,
                "patch_size": config.vision.patch_size,
                "spatial_merge_size": config.vision.spatial_merge_size,
                "intermediate_size": config.vision.intermediate_size,
                "out_hidden_size": config.vision.hidden_size,
                "rope_theta": config.vision.rope_theta,
                "window_size": config.vision.window.as_ref().map(|w| w.window_size),
                "fullatt_block_indexes":
                    config.vision.window.as_ref().map(|w| w.full_attention_blocks.clone()),
                "num_position_embeddings": config.vision.position_grid.map(|s| s * s),
                "deepstack_visual_indexes": config.vision.deepstack,
            },
            "defaults_applied": config.defaults,
            "image_processor": {
                "min_pixels": ipc.min_pixels,
                "max_pixels": ipc.max_pixels,
                "patch_size": ipc.patch_size,
                "backend": backend_name(ipc.backend),
            },
            "tokenizer_vocab": proc.tokenizer.vocab_size(),
            "weight_layout": format!("{layout:?}").to_lowercase(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    let t = &config.text;
    let v = &config.vision;
    println!("checkpoint   {}", dir.display());
    println!(
        "architecture {} ({})",
        config.arch.name(),
        config.arch.class_name()
    );
    println!("parameters   {} ({:.1}M)", params, params as f64 / 1e6);
    let stored: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} ({n})")).collect();
    println!(
        "dtype        stored as {}; config says {}",
        stored.join(", "),
        config.saved_dtype.as_deref().unwrap_or("nothing")
    );
    if let Some(q) = quantized {
        println!(
            "quantized    {} linear layers ({} tensors, u8 above), LM head {}; runs on the CPU \
             (here on the {} kernel)",
            q.name(),
            weights.quantized().len(),
            head_format.map_or("dense", |h| h.name()),
            crate::kernels::quant::kernel().name()
        );
    }
    println!(
        "decoder      {} layers, hidden {}, {} heads / {} kv heads (head {}), mlp {}, vocab {}, \
         rope theta {}, mrope_section {:?}{}, lm_head {}",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
        t.vocab_size,
        t.rope_theta,
        t.mrope_section,
        if t.mrope_interleaved {
            " interleaved"
        } else {
            ""
        },
        if t.tie_word_embeddings {
            "tied to embeddings"
        } else {
            "separate"
        }
    );
    if t.qk_norm {
        println!("             per-head RMSNorm of q and k, no q/k/v bias (Qwen3)");
    }
    println!(
        "vision       {} blocks, dim {}, {} heads, mlp {}, patch {}x{} over {} frames, merge {}x{} -> hidden {}",
        v.depth,
        v.embed_dim,
        v.num_heads,
        v.mlp_hidden(),
        v.patch_size,
        v.patch_size,
        v.temporal_patch_size,
        v.spatial_merge_size,
        v.spatial_merge_size,
        v.hidden_size
    );
    if let Some(w) = &v.window {
        println!(
            "             window attention: {} px windows; full attention in blocks {:?}",
            w.window_size, w.full_attention_blocks
        );
    }
    if let Some(side) = v.position_grid {
        let levels = v.deepstack.len().min(t.num_hidden_layers);
        println!(
            "             learned {side}x{side} position embeddings resampled to each image; \
             DeepStack: blocks {:?} added after the first {levels} decoder layers",
            v.deepstack,
        );
    }
    if config.defaults.is_empty() {
        println!("defaults     none: config.json sets every setting medvlm reads");
    } else {
        println!("defaults     not in config.json, transformers' defaults used:");
        for d in &config.defaults {
            println!("               {d}");
        }
    }
    println!(
        "images       {}..{} pixels after resizing, one token per {}x{} pixels, {} arithmetic",
        ipc.min_pixels,
        ipc.max_pixels,
        ipc.patch_size * ipc.merge_size,
        ipc.patch_size * ipc.merge_size,
        backend_name(ipc.backend)
    );
    println!(
        "tokenizer    {} tokens; weights in {} file(s), {} layout",
        proc.tokenizer.vocab_size(),
        weights.files().len(),
        format!("{layout:?}").to_lowercase()
    );
    Ok(())
}

/// How `inspect` names an image backend.
fn backend_name(b: crate::processor::image_processor::Backend) -> &'static str {
    match b {
        crate::processor::image_processor::Backend::Pil => "PIL (transformers 4.57)",
        crate::processor::image_processor::Backend::Torchvision => {
            "torchvision (transformers 5.24)"
        }
    }
}
