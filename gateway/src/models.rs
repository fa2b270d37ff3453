//! The models a gateway serves, loaded once at start: GGUF language models (files) and BERT
//! sentence-embedding models (sentence-transformers directories), each under an id that
//! requests name in `model`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hashgrid_infer::TextModel;
use hashgrid_infer::bert::{BertModel, BertWeights};

/// A BERT sentence-embedding model, opened and read.
pub struct EmbedModel {
    /// The model directory's config and tokenizer.
    pub model: BertModel,
    /// Its weights, as the jobs' input blobs.
    pub weights: BertWeights,
}

/// What kind of model an id names.
#[derive(Clone)]
pub enum Model {
    /// A language model: chat and completions.
    Text(Arc<TextModel>),
    /// An embedding model: embeddings.
    Embed(Arc<EmbedModel>),
}

/// A served model.
#[derive(Clone)]
pub struct ModelEntry {
    /// The id requests name.
    pub id: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Unix seconds it was loaded at (`created` in `/v1/models`).
    pub created: u64,
    /// The model.
    pub model: Model,
}

/// A model that cannot be served, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LoadError {
    /// The file or directory.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// The default id of a model at `path`: the file name without `.gguf`, or the directory name.
pub fn default_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

/// Loads a model named `ID=PATH` or `PATH` (the id is then [`default_id`]): a directory is a
/// BERT embedding model, a file a GGUF language model. Blocking (reads the weights).
pub fn load(spec: &str) -> Result<ModelEntry, LoadError> {
    let (id, path) = match spec.split_once('=') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') => {
            (id.to_string(), PathBuf::from(path))
        }
        _ => (default_id(Path::new(spec)), PathBuf::from(spec)),
    };
    let err = |message: String| LoadError {
        path: path.clone(),
        message,
    };
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == ' ') {
        return Err(err(format!(
            "{id:?} is not a usable model id (1 to 128 characters, no spaces)"
        )));
    }
    let model = if path.is_dir() {
        let model = BertModel::open(&path).map_err(|e| err(e.to_string()))?;
        let weights = BertWeights::load(&model).map_err(|e| err(e.to_string()))?;
        Model::Embed(Arc::new(EmbedModel { model, weights }))
    } else {
        Model::Text(Arc::new(
            TextModel::open(&path).map_err(|e| err(e.to_string()))?,
        ))
    };
    Ok(ModelEntry {
        id,
        path,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model,
    })
}

/// Loads every model in `specs` (see [`load`]); two models under one id is an error.
pub fn load_all(specs: &[String]) -> Result<BTreeMap<String, ModelEntry>, LoadError> {
    let mut out = BTreeMap::new();
    for s in specs {
        let m = load(s)?;
        if out.contains_key(&m.id) {
            return Err(LoadError {
                path: m.path,
                message: format!("a second model with the id {:?}; name one ID=PATH", m.id),
            });
        }
        out.insert(m.id.clone(), m);
    }
    Ok(out)
}
