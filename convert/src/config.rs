//! The JSON files of a Hugging Face Asagi folder, read with errors that name the file and the key.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// A parsed JSON file and where it came from.
#[derive(Clone, Debug)]
pub struct JsonFile {
    pub path: PathBuf,
    pub value: Value,
}

impl JsonFile {
    /// Reads and parses `dir/name`.
    pub fn read(dir: &Path, name: &str) -> Result<JsonFile> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Ok(JsonFile { path, value })
    }

    /// Reads `dir/name` if it exists.
    pub fn read_optional(dir: &Path, name: &str) -> Result<Option<JsonFile>> {
        if dir.join(name).exists() {
            JsonFile::read(dir, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The value at a dotted path (`text_config.hidden_size`), if present and not null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        key.split('.').try_fold(&self.value, |v, k| v.get(k)).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> anyhow::Error {
        anyhow!("{}: missing key {key}", self.path.display())
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> anyhow::Error {
        anyhow!("{}: key {key} should be {want}, found {v}", self.path.display())
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// An optional non-negative integer.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|_| self.usize(key)).transpose()
    }

    /// A required integer (may be negative).
    pub fn i64(&self, key: &str) -> Result<i64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_i64().ok_or_else(|| self.wrong(key, "an integer", v))
    }

    /// A required number.
    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64().ok_or_else(|| self.wrong(key, "a number", v))
    }

    /// An optional number.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|_| self.f64(key)).transpose()
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// An optional string.
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.str(key)).transpose()
    }

    /// An optional boolean.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(key, "a boolean", v)),
        }
    }

    /// A required array of numbers.
    pub fn f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.wrong(key, "an array of numbers", v))
    }
}

/// Shapes and options of the language model (`text_config`), all read from config.json.
#[derive(Clone, Debug)]
pub struct TextConfig {
    pub hidden: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub n_ctx: usize,
}

/// Shapes and options of the vision tower (`vision_config`) and of the LLaVA wrapper.
#[derive(Clone, Debug)]
pub struct VisionConfig {
    pub hidden: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub ffn: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub layer_norm_eps: f32,
    pub hidden_act: String,
    /// Blocks actually run: HF `hidden_states[vision_feature_layer]` is the output after this many blocks.
    pub n_used_layers: usize,
    pub select_strategy: String,
    pub projector_act: String,
}

/// What config.json says about an Asagi (LLaVA) checkpoint.
#[derive(Clone, Debug)]
pub struct AsagiConfig {
    pub file: JsonFile,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: usize,
    pub pad_token_id: Option<usize>,
}

impl AsagiConfig {
    /// Reads `dir/config.json` and checks it describes a LLaVA-style SigLIP + Llama model.
    pub fn read(dir: &Path) -> Result<AsagiConfig> {
        let f = JsonFile::read(dir, "config.json")?;
        let model_type = f.str("model_type")?;
        if model_type != "llava" {
            bail!("{}: model_type is {model_type:?}; an Asagi checkpoint is a \"llava\" model", f.path.display());
        }
        let text_type = f.str_opt("text_config.model_type")?.unwrap_or("llama");
        if text_type != "llama" {
            bail!("{}: text_config.model_type is {text_type:?}, expected \"llama\"", f.path.display());
        }
        let vision_type = f.str_opt("vision_config.model_type")?.unwrap_or("siglip_vision_model");
        if !vision_type.starts_with("siglip") {
            bail!("{}: vision_config.model_type is {vision_type:?}, expected a SigLIP vision model", f.path.display());
        }
        if f.bool_opt("tie_word_embeddings")?.unwrap_or(false)
            || f.bool_opt("text_config.tie_word_embeddings")?.unwrap_or(false)
        {
            bail!("{}: tie_word_embeddings is true; Asagi's lm_head is untied", f.path.display());
        }

        let hidden = f.usize("text_config.hidden_size")?;
        let n_head = f.usize("text_config.num_attention_heads")?;
        let head_dim = f.usize_opt("text_config.head_dim")?.unwrap_or(if n_head > 0 { hidden / n_head } else { 0 });
        if n_head == 0 || head_dim * n_head != hidden || head_dim % 2 != 0 {
            bail!(
                "{}: text_config: hidden_size {hidden} with {n_head} heads gives head_dim {head_dim}; llama needs an \
                 even head_dim with head_dim x heads = hidden_size",
                f.path.display()
            );
        }
        let n_head_kv = f.usize_opt("text_config.num_key_value_heads")?.unwrap_or(n_head);
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            bail!("{}: text_config.num_key_value_heads {n_head_kv} does not divide {n_head} heads", f.path.display());
        }
        if let Some(s) = f.get("text_config.rope_scaling") {
            bail!("{}: text_config.rope_scaling {s} is not supported (llm-jp-3 has none)", f.path.display());
        }
        let text = TextConfig {
            hidden,
            n_layer: f.usize("text_config.num_hidden_layers")?,
            n_head,
            n_head_kv,
            head_dim,
            ffn: f.usize("text_config.intermediate_size")?,
            rms_eps: f.f64("text_config.rms_norm_eps")? as f32,
            rope_theta: f.f64_opt("text_config.rope_theta")?.unwrap_or(10000.0) as f32,
            n_ctx: f.usize_opt("text_config.max_position_embeddings")?.unwrap_or(4096),
        };

        let n_vlayer = f.usize("vision_config.num_hidden_layers")?;
        let feature_layer = f.get("vision_feature_layer").ok_or_else(|| f.missing("vision_feature_layer"))?;
        let feature_layer = feature_layer.as_i64().ok_or_else(|| {
            f.wrong("vision_feature_layer", "one integer (lists of layers are not supported)", feature_layer)
        })?;
        // hidden_states has n_vlayer + 1 entries: [0] the embeddings, [k] the output of block k.
        let n_used = if feature_layer < 0 { n_vlayer as i64 + 1 + feature_layer } else { feature_layer };
        if n_used < 1 || n_used > n_vlayer as i64 {
            bail!("{}: vision_feature_layer {feature_layer} selects no encoder block of {n_vlayer}", f.path.display());
        }
        let select_strategy = f.str("vision_feature_select_strategy")?.to_string();
        if select_strategy != "default" && select_strategy != "full" {
            bail!(
                "{}: vision_feature_select_strategy {select_strategy:?} is neither \"default\" nor \"full\"",
                f.path.display()
            );
        }
        let projector_act = f.str_opt("projector_hidden_act")?.unwrap_or("gelu").to_string();
        if !matches!(projector_act.as_str(), "gelu" | "gelu_pytorch_tanh") {
            bail!("{}: projector_hidden_act {projector_act:?} is not supported", f.path.display());
        }
        let hidden_act = f.str_opt("vision_config.hidden_act")?.unwrap_or("gelu_pytorch_tanh").to_string();
        if !matches!(hidden_act.as_str(), "gelu" | "gelu_pytorch_tanh") {
            bail!("{}: vision_config.hidden_act {hidden_act:?} is not supported", f.path.display());
        }
        let vision = VisionConfig {
            hidden: f.usize("vision_config.hidden_size")?,
            n_layer: n_vlayer,
            n_head: f.usize("vision_config.num_attention_heads")?,
            ffn: f.usize("vision_config.intermediate_size")?,
            patch_size: f.usize("vision_config.patch_size")?,
            image_size: f.usize("vision_config.image_size")?,
            layer_norm_eps: f.f64_opt("vision_config.layer_norm_eps")?.unwrap_or(1e-6) as f32,
            hidden_act,
            n_used_layers: n_used as usize,
            select_strategy,
            projector_act,
        };
        if vision.n_head == 0 || vision.hidden % vision.n_head != 0 || vision.patch_size == 0 {
            bail!("{}: vision_config hidden_size/num_attention_heads/patch_size are inconsistent", f.path.display());
        }
        let image_token_id = f.usize("image_token_index")?;
        let pad_token_id = f.usize_opt("pad_token_id")?;
        Ok(AsagiConfig { file: f, text, vision, image_token_id, pad_token_id })
    }
}
