//! The slices of a volume as the frames of one video, against transformers 4.57
//! (tools/make_video_fixtures.py): the video processor's pixels bit for bit, prompt ids with
//! `<|video_pad|>` runs, M-RoPE positions (Qwen2.5-VL's time interval included), logits and
//! greedy decoding, on Qwen2-VL (tiny-a) and Qwen2.5-VL with window attention (tiny-25a), a
//! video alone and a video and an image in one prompt.

use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use medvlm::generate::{Engine, Request, SamplingParams};
use medvlm::model::Qwen2Vl;
use medvlm::processor::{PixelPatches, Processor, ProcessorOptions, Visual};

fn video_dir() -> PathBuf {
    fixtures().join("video")
}

/// A copy of a tiny checkpoint with the fixture's video_preprocessor_config.json beside it
/// (transformers wrote it; the tiny checkpoints have none).
fn checkpoint_with_video_config(model: &str, tmp: &Path) -> PathBuf {
    let dir = tmp.join(model);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join(model)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    std::fs::copy(
        video_dir().join("video_preprocessor_config.json"),
        dir.join("video_preprocessor_config.json"),
    )
    .unwrap();
    dir
}

fn frames(names: &serde_json::Value) -> Vec<image::RgbImage> {
    names
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            image::open(video_dir().join(n.as_str().unwrap()))
                .unwrap()
                .to_rgb8()
        })
        .collect()
}

fn same_bits(got: &PixelPatches, want: &Tensor, what: &str) {
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.data.len(), want.len(), "{what}: pixel count");
    let bad = got
        .data
        .iter()
        .zip(&want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = bad {
        panic!(
            "{what}: pixel value {i} is {} but transformers has {}",
            got.data[i], want[i]
        );
    }
}

#[test]
fn videos_match_transformers() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(video_dir().join("cases.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(video_dir().join("cases.safetensors"), &Device::Cpu)
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in meta["cases"].as_array().unwrap() {
        let model_name = case["model"].as_str().unwrap();
        let key = format!("{model_name}.{}", case["name"].as_str().unwrap());
        let dir = checkpoint_with_video_config(model_name, tmp.path());
        let proc = Processor::from_dir(&dir, &ProcessorOptions::default()).unwrap();
        let model = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();

        // The visual inputs in the order the messages name them.
        let msgs = messages(&case["messages"]);
        let mut videos = case["frames"].as_object().unwrap().values();
        let mut images = case["images"].as_array().unwrap().iter();
        let mut visuals = Vec::new();
        for kind in msgs.iter().flat_map(|m| m.visuals()) {
            visuals.push(match kind {
                Visual::Video => {
                    let v = proc
                        .preprocess_video(&frames(videos.next().unwrap()))
                        .unwrap();
                    same_bits(
                        &v,
                        &tensors[&format!("{key}.pixel_values_videos")],
                        &format!("{key} video pixels"),
                    );
                    v
                }
                Visual::Image => {
                    let name = images.next().unwrap().as_str().unwrap();
                    let p = proc.load_image(&fixture_image(name)).unwrap();
                    same_bits(
                        &p,
                        &tensors[&format!("{key}.pixel_values")],
                        &format!("{key} image pixels"),
                    );
                    p
                }
            });
        }
        let want_grids: Vec<Vec<usize>> =
            serde_json::from_value(case["video_grid_thw"].clone()).unwrap();
        let got_grids: Vec<Vec<usize>> = visuals
            .iter()
            .filter(|p| p.kind == Visual::Video)
            .map(|p| p.grid_thw.to_vec())
            .collect();
        assert_eq!(got_grids, want_grids, "{key}: video grids");

        let prompt = proc.prepare(&msgs, visuals, true).unwrap();
        assert_eq!(prompt.text, case["prompt"].as_str().unwrap(), "{key}: text");
        assert_eq!(prompt.input_ids, u32s(&case["input_ids"]), "{key}: ids");

        // Positions exactly, with the video's time interval (1 in Qwen2-VL, 4 in tiny-25a);
        // logits within the bound the image parity tests use.
        check_positions_and_logits(
            &model,
            &prompt,
            &tensors[&format!("{key}.position_ids")],
            case["rope_delta"].as_i64().unwrap(),
            &tensors[&format!("{key}.logits")],
            &key,
        );

        // Greedy decoding through the engine (cached positions continue after the video).
        let engine = Engine::new(&model, proc.tokenizer.stop_tokens().to_vec(), vec![]);
        let req = Request {
            prompt: &prompt,
            sampling: SamplingParams::default(),
            max_new_tokens: 16,
            num_samples: 1,
        };
        let out = engine
            .generate(&[req], |_, _, _| {})
            .unwrap()
            .remove(0)
            .remove(0);
        assert_eq!(
            out.tokens,
            u32s(&case["greedy_new_tokens"]),
            "{key}: greedy continuation"
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// Without video_preprocessor_config.json a checkpoint's videos take transformers' video
/// pixel bounds (128 x 28 x 28 to 768 x 28 x 28 per frame), not its images' bounds: a
/// 84x56 frame grows to what transformers' `smart_resize(56, 84, 28, 100352, 602112)`
/// gives: 280 x 392.
#[test]
fn videos_without_their_config_use_the_video_bounds() {
    let proc =
        Processor::from_dir(&fixtures().join("tiny-a"), &ProcessorOptions::default()).unwrap();
    assert_eq!(proc.video.config.min_pixels, 128 * 28 * 28);
    assert_eq!(proc.video.config.max_pixels, 768 * 28 * 28);
    let v = proc
        .preprocess_video(&[image::RgbImage::new(84, 56)])
        .unwrap();
    // One frame pads to two: one temporal patch.
    assert_eq!(v.grid_thw, [1, 280 / 14, 392 / 14]);
    // A frame of another size is refused with both sizes named.
    let e = proc
        .preprocess_video(&[image::RgbImage::new(84, 56), image::RgbImage::new(56, 84)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("frame 1 is 56x84 but frame 0 is 84x56"), "{e}");
}
