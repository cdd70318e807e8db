//! `medvlm serve`: flags to [`crate::serve::ServeOptions`].

use super::*;

pub(super) fn run_serve(a: ServeArgs) -> Result<()> {
    let secs = |name: &str, v: f64| -> Result<std::time::Duration> {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be a positive number of seconds, got {v}");
        }
        Ok(std::time::Duration::from_secs_f64(v))
    };
    if a.max_body_mb == 0 {
        bail!("--max-body-mb must be at least 1");
    }
    crate::serve::run(crate::serve::ServeOptions {
        source: a.model.source(),
        // DICOM/NIfTI windows and slices are per request ("window", "slice").
        processor: a.limits.options(Default::default()),
        host: a.host,
        port: a.port,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        served_model_name: a.served_model_name,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        allowed_local_media_path: a.allowed_local_media_path,
        max_body_bytes: a.max_body_mb.saturating_mul(1 << 20),
        request_timeout: secs("--request-timeout", a.request_timeout)?,
        shutdown_timeout: secs("--shutdown-timeout", a.shutdown_timeout)?,
        reasoning: a.reasoning_format,
        prefill_chunk: a.prefill_chunk,
    })
}
