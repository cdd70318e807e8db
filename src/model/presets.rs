//! Released architectures as config.json files, for scale tests, benchmarks and memory
//! plans where the released weights cannot be downloaded (`medvlm init --preset`, `medvlm
//! bench --preset`). The files live in `src/model/presets/`, where tools/ scripts read them
//! too, so transformers and medvlm build the same shapes.

/// A named architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Qwen2-VL-2B-Instruct: 28 layers x 1536, 12/2 heads, MLP 8960, vocabulary 151,936,
    /// tied embeddings, vision 32 x 1280; its config.json as released.
    #[value(name = "qwen2-vl-2b")]
    Qwen2Vl2b,
    /// The benchmark shape (src/model/presets/qwen2-vl-bench.json, 119.7M parameters):
    /// Qwen2-VL's architecture and 151,936-token vocabulary, scaled down.
    #[value(name = "qwen2-vl-bench")]
    Qwen2VlBench,
    /// The second benchmark shape (src/model/presets/qwen2-vl-bench-layers.json, 178.7M
    /// parameters): 16 layers x 768, MLP 3072, a 32,768-token vocabulary, the benchmark
    /// vision tower. Its embedding is 14% of the weights (the benchmark shape's 65%), so the
    /// decoder layers, not the LM head, decide its speed.
    #[value(name = "qwen2-vl-bench-layers")]
    Qwen2VlBenchLayers,
    /// Qwen3-VL-2B-Instruct: 28 layers x 2048, 16/8 heads of 128, MLP 6144, vocabulary
    /// 151,936, tied embeddings, vision 24 x 1024 with DeepStack from blocks 5, 11, 17;
    /// 2,127,532,032 parameters.
    #[value(name = "qwen3-vl-2b")]
    Qwen3Vl2b,
}

impl Preset {
    /// The config.json text.
    pub fn config_json(self) -> &'static str {
        match self {
            Preset::Qwen2Vl2b => QWEN2_VL_2B,
            Preset::Qwen2VlBench => QWEN2_VL_BENCH,
            Preset::Qwen2VlBenchLayers => QWEN2_VL_BENCH_LAYERS,
            Preset::Qwen3Vl2b => QWEN3_VL_2B,
        }
    }

    /// Its name in reports.
    pub fn label(self) -> &'static str {
        match self {
            Preset::Qwen2Vl2b => "Qwen2-VL-2B-Instruct",
            Preset::Qwen2VlBench => "src/model/presets/qwen2-vl-bench.json",
            Preset::Qwen2VlBenchLayers => "src/model/presets/qwen2-vl-bench-layers.json",
            Preset::Qwen3Vl2b => "Qwen3-VL-2B-Instruct",
        }
    }

    /// The parsed config.
    pub fn config(self) -> super::Qwen2VlConfig {
        super::Qwen2VlConfig::from_json_str(self.config_json(), self.label())
            .expect("the preset configs are valid (tested)")
    }
}

/// Qwen/Qwen2-VL-2B-Instruct's config.json, as released.
pub const QWEN2_VL_2B: &str = include_str!("presets/qwen2-vl-2b.json");

/// The benchmark model's config.json.
pub const QWEN2_VL_BENCH: &str = include_str!("presets/qwen2-vl-bench.json");

/// The layer-heavy benchmark shape's config.json (small vocabulary, special tokens from id
/// 32,000).
pub const QWEN2_VL_BENCH_LAYERS: &str = include_str!("presets/qwen2-vl-bench-layers.json");

/// Qwen/Qwen3-VL-2B-Instruct's config.json in the released files' layout (transformers 4.57:
/// text_config with rope_scaling, legacy vision model_type, the tie flag at both levels).
/// Not the file itself, which no source here holds verbatim: its values as third-party
/// copies of it give them (text sizes, DeepStack blocks), the vision tower as torchtitan's
/// "2B" flavour and the 4B release (the same tower) give it, and the tie inferred from the
/// released weights' size (4.26 GB of bf16 is 2.128B parameters, tied; see
/// notes/28-research.md §1.3). transformers 5.24 builds 2,127,532,032 parameters from it.
pub const QWEN3_VL_2B: &str = include_str!("presets/qwen3-vl-2b.json");

/// The Qwen3-VL Instruct chat template, verbatim (TRL 1.16.0's trl/chat_templates/
/// qwen3_vl.jinja, "Original Qwen3-VL chat template", sha256 3636d0f0..; the same bytes as
/// Qwen/Qwen3-VL-8B-Instruct-GGUF's): no default system prompt, generation prompt
/// `<|im_start|>assistant\n`.
pub const QWEN3_VL_CHAT_TEMPLATE: &str = include_str!("presets/qwen3-vl-chat-template.jinja");

/// Qwen/Qwen2-VL-2B-Instruct's chat template, verbatim.
pub const QWEN2_VL_CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// Every preset parses, and transformers counts the same parameters:
    /// `Qwen2VLForConditionalGeneration(config).num_parameters()` gives 119,719,168 for the
    /// bench shape, 178,663,168 for the layer-heavy one, 2,208,985,600 for the released 2B
    /// config, and
    /// `Qwen3VLForConditionalGeneration` 2,127,532,032 for Qwen3-VL-2B (transformers 5.24,
    /// built on the meta device).
    #[test]
    fn presets_parse_with_transformers_parameter_counts() {
        for p in Preset::value_variants() {
            let expected = match p {
                Preset::Qwen2VlBench => 119_719_168,
                Preset::Qwen2VlBenchLayers => 178_663_168,
                Preset::Qwen2Vl2b => 2_208_985_600,
                Preset::Qwen3Vl2b => 2_127_532_032,
            };
            assert_eq!(super::super::num_parameters(&p.config()).unwrap(), expected);
        }
    }
}
