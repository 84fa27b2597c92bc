//! What a request will cost before it is sent, counted as OpenAI's rate limiter
//! counts it at the request's arrival: tokens estimated from the request's
//! characters (not tiktoken), plus the most the answer may take
//! (`max_tokens` × `n`, the image output table), and images. Where the request
//! leaves something open (`auto` size or quality, no `max_tokens`, an unknown
//! model) the estimate takes the expensive side.

use std::collections::{BTreeMap, HashMap};

use crate::vocab::json::Json;
use wildmatch::WildMatch;

use crate::config::EstimateConfig;
use crate::vocab::cost::{
    Cost, ImageAsk, ImageTable, check_image_tables, parse_image_size as parse_size,
};
use crate::vocab::route::Route;

/// gpt-image-1, -1-mini and -1.5 output tokens per image (see the OpenAI contract).
fn builtin_image_table() -> ImageTable {
    let row = |a, b, c| {
        BTreeMap::from([
            ("1024x1024".to_string(), a),
            ("1024x1536".to_string(), b),
            ("1536x1024".to_string(), c),
        ])
    };
    BTreeMap::from([
        ("low".to_string(), row(272, 408, 400)),
        ("medium".to_string(), row(1056, 1584, 1568)),
        ("high".to_string(), row(4160, 6240, 6208)),
    ])
}

/// Tokens each partial image adds.
const PARTIAL_IMAGE_TOKENS: u64 = 100;
/// An image part of a chat message whose size is unknown (a high-detail 1024 square).
const CHAT_IMAGE_TOKENS: u64 = 765;
/// Output tokens of a legacy completion without `max_tokens` (the API's default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

/// An image given to an edit: its pixel size when penstock could read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputImage {
    pub size: Option<(u32, u32)>,
}

/// What penstock reads of a multipart body: text fields and images for pricing,
/// and a digest of every part's name and content (not its boundary or part order
/// between different names) for the cache key.
#[derive(Debug, Default, Clone)]
pub struct MultipartSummary {
    pub fields: HashMap<String, String>,
    pub images: Vec<InputImage>,
    pub digest: [u8; 32],
}

/// A parsed body, as the estimator sees it.
pub enum Body<'a> {
    Json(&'a Json<'a>),
    Multipart(&'a MultipartSummary),
    None,
}

#[derive(Debug)]
pub struct Estimator {
    default_max_output_tokens: u64,
    chars_per_token: f64,
    image_tables: Vec<(WildMatch, ImageTable)>,
    builtin_images: ImageTable,
}

impl Estimator {
    /// Errors name the offending key below `estimate.` and what was expected.
    pub fn new(config: &EstimateConfig) -> Result<Estimator, (String, String)> {
        check_image_tables(&config.image_output_tokens)?;
        Ok(Estimator {
            default_max_output_tokens: config.default_max_output_tokens,
            chars_per_token: config.chars_per_token,
            image_tables: config
                .image_output_tokens
                .iter()
                .map(|(glob, table)| (WildMatch::new(glob), table.clone()))
                .collect(),
            builtin_images: builtin_image_table(),
        })
    }

    /// Output tokens assumed for a request that sets no limit of its own.
    pub(crate) fn default_output(&self) -> u64 {
        self.default_max_output_tokens
    }

    /// Tokens of a text as OpenAI's limiter estimates them: by its characters.
    /// `model` is kept for when a model's ratio differs.
    pub(crate) fn count_tokens(&self, _model: &str, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let chars = text.chars().count() as f64;
        // Saturates: a float too large for u64 becomes u64::MAX.
        (chars / self.chars_per_token).ceil() as u64
    }

    pub fn estimate(&self, route: Route, model: Option<&str>, body: Body<'_>) -> Cost {
        let model = model.unwrap_or("");
        let mut cost = Cost {
            requests: 1,
            tokens: 0,
            images: 0,
        };
        match (route, body) {
            (r, Body::Json(v)) if r.is_image() => {
                self.image_cost(model, &ImageParams::from_json(v), &mut cost)
            }
            (r, Body::Multipart(m)) if r.is_image() => {
                self.image_cost(model, &ImageParams::from_multipart(m), &mut cost)
            }
            (Route::ChatCompletions, Body::Json(v)) => {
                let mut tokens: u64 = 2;
                for m in v
                    .get("messages")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    tokens = tokens
                        .saturating_add(4)
                        .saturating_add(self.content_tokens(model, m.get("content")));
                }
                if let Some(tools) = v.get("tools").or(v.get("functions")) {
                    tokens = tokens.saturating_add(self.count_tokens(model, &tools.to_string()));
                }
                let max = uint(v, "max_completion_tokens")
                    .or(uint(v, "max_tokens"))
                    .unwrap_or(self.default_max_output_tokens);
                cost.tokens =
                    tokens.saturating_add(uint(v, "n").unwrap_or(1).max(1).saturating_mul(max));
            }
            (Route::Completions, Body::Json(v)) => {
                let prompt = self.strings_tokens(model, v.get("prompt"));
                let max = uint(v, "max_tokens").unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS);
                cost.tokens =
                    prompt.saturating_add(uint(v, "n").unwrap_or(1).max(1).saturating_mul(max));
            }
            (Route::Responses, Body::Json(v)) => {
                let input = self
                    .strings_tokens(model, v.get("input"))
                    .saturating_add(self.strings_tokens(model, v.get("instructions")))
                    .saturating_add(self.strings_tokens(model, v.get("tools")));
                let max = uint(v, "max_output_tokens").unwrap_or(self.default_max_output_tokens);
                cost.tokens = input.saturating_add(max);
            }
            (Route::Embeddings, Body::Json(v)) => {
                cost.tokens = self.strings_tokens(model, v.get("input"));
            }
            (_, Body::Json(v)) => {
                // An operation penstock has no rule for: every string it carries,
                // plus the default answer size.
                cost.tokens = self
                    .strings_tokens(model, Some(v))
                    .saturating_add(self.default_max_output_tokens);
            }
            _ => {}
        }
        cost
    }

    /// A Responses request's `image_generation` tool, when the model is told
    /// to call it or may (it is offered and `tool_choice` is not `none`): the
    /// image model whose limits it spends (the tool's `model`, else the
    /// route's default for images) and what it costs there: one image, its
    /// tokens by the image table (quality, size, partial images), the
    /// input's text. A tool not called is given back once the answer says so.
    pub(crate) fn responses_image_tool(
        &self,
        v: &Json<'_>,
        default_model: &str,
    ) -> Option<(String, Cost)> {
        let tool = v
            .get("tools")?
            .as_array()?
            .iter()
            .find(|t| t.get("type").and_then(Json::as_str) == Some("image_generation"))?;
        if v.get("tool_choice").and_then(Json::as_str) == Some("none") {
            return None;
        }
        let model = tool
            .get("model")
            .and_then(Json::as_str)
            .unwrap_or(default_model)
            .to_string();
        let s = |k: &str| tool.get(k).and_then(Json::as_str).map(str::to_string);
        let partial_images = uint(tool, "partial_images").unwrap_or(0);
        let params = ImageParams {
            prompt: String::new(),
            n: 1,
            size: s("size"),
            quality: s("quality"),
            stream: partial_images > 0,
            partial_images,
            high_fidelity: s("input_fidelity").as_deref() == Some("high"),
            images: Vec::new(),
        };
        let mut cost = Cost {
            requests: 1,
            tokens: 0,
            images: 0,
        };
        self.image_cost(&model, &params, &mut cost);
        cost.tokens = cost
            .tokens
            .saturating_add(self.strings_tokens(&model, v.get("input")));
        Some((model, cost))
    }

    /// Tokens of a chat message's `content`: a string, or parts of text and images.
    fn content_tokens(&self, model: &str, content: Option<&Json<'_>>) -> u64 {
        match content {
            Some(Json::String(s)) => self.count_tokens(model, s),
            Some(Json::Array(parts)) => parts
                .iter()
                .map(|p| match p.get("type").and_then(Json::as_str) {
                    Some("text") => {
                        self.count_tokens(model, p.get("text").and_then(Json::as_str).unwrap_or(""))
                    }
                    Some("image_url" | "input_image") => CHAT_IMAGE_TOKENS,
                    _ => self.strings_tokens(model, Some(p)),
                })
                .fold(0, u64::saturating_add),
            _ => 0,
        }
    }

    /// Tokens of every string inside a value (prompts given as strings, arrays of
    /// strings, token arrays or nested input items).
    fn strings_tokens(&self, model: &str, v: Option<&Json<'_>>) -> u64 {
        match v {
            Some(Json::String(s)) => self.count_tokens(model, s),
            Some(Json::Number(_)) => 1,
            Some(Json::Array(a)) => a
                .iter()
                .map(|x| self.strings_tokens(model, Some(x)))
                .fold(0, u64::saturating_add),
            Some(Json::Object(o)) => o
                .iter()
                .filter(|(k, _)| !matches!(k.as_ref(), "type" | "role" | "model" | "id"))
                .map(|(_, x)| self.strings_tokens(model, Some(x)))
                .fold(0, u64::saturating_add),
            _ => 0,
        }
    }

    fn image_cost(&self, model: &str, p: &ImageParams, cost: &mut Cost) {
        let table = self
            .image_tables
            .iter()
            .find(|(g, _)| g.matches(model))
            .map_or(&self.builtin_images, |(_, t)| t);
        let per_image = image_output_tokens(table, p.quality.as_deref(), p.size.as_deref());
        let partials = if p.stream {
            p.partial_images.saturating_mul(PARTIAL_IMAGE_TOKENS)
        } else {
            0
        };
        let inputs: u64 = p
            .images
            .iter()
            .map(|i| input_image_tokens(*i, p.high_fidelity))
            .fold(0, u64::saturating_add);
        cost.images = p.n;
        cost.tokens = self
            .count_tokens(model, &p.prompt)
            .saturating_add(inputs)
            .saturating_add(p.n.saturating_mul(per_image.saturating_add(partials)));
    }
}

/// What an image request asks for (count, quality, size), for pricing by image.
pub fn image_ask(route: Route, body: Body<'_>) -> Option<ImageAsk> {
    if !route.is_image() {
        return None;
    }
    let p = match body {
        Body::Json(v) => ImageParams::from_json(v),
        Body::Multipart(m) => ImageParams::from_multipart(m),
        Body::None => return None,
    };
    Some(ImageAsk {
        n: p.n,
        quality: p.quality,
        size: p.size,
    })
}

fn uint(v: &Json<'_>, key: &str) -> Option<u64> {
    v.get(key).and_then(Json::as_u64)
}

/// Output tokens of one image. An open or unknown quality takes the dearest row;
/// an open size the dearest column; a size not in the table scales the row's
/// smallest entry by pixel area.
fn image_output_tokens(table: &ImageTable, quality: Option<&str>, size: Option<&str>) -> u64 {
    let quality = match quality {
        Some("standard") => Some("medium"),
        Some("hd") => Some("high"),
        q => q,
    };
    let dearest_row = || {
        table
            .values()
            .max_by_key(|row| row.values().max().copied().unwrap_or(0))
    };
    let Some(row) = quality.and_then(|q| table.get(q)).or_else(dearest_row) else {
        return 0;
    };
    let dearest = row.values().max().copied().unwrap_or(0);
    match size.filter(|s| *s != "auto") {
        Some(s) => match (row.get(s), parse_size(s)) {
            (Some(t), _) => *t,
            (None, Some((w, h))) => {
                let (base_px, base_tokens) = row
                    .iter()
                    .filter_map(|(k, t)| parse_size(k).map(|(bw, bh)| (bw.saturating_mul(bh), *t)))
                    .min_by_key(|(px, _)| *px)
                    .unwrap_or((1024 * 1024, dearest));
                (base_tokens.saturating_mul(w).saturating_mul(h))
                    .div_ceil(base_px.max(1))
                    .max(base_tokens)
            }
            (None, None) => dearest,
        },
        None => dearest,
    }
}

/// Input tokens of an edit's image: 65 + 129 per 512-px tile once its short side is
/// scaled to 512; high fidelity adds 4160 (square) or 6240. An image whose size
/// could not be read is priced as a long 1:2 one.
fn input_image_tokens(image: InputImage, high_fidelity: bool) -> u64 {
    let (w, h) = image
        .size
        .map_or((512.0, 1024.0), |(w, h)| (w.max(1) as f64, h.max(1) as f64));
    let scale = 512.0 / w.min(h);
    let tiles = ((w * scale) / 512.0).ceil() as u64 * ((h * scale) / 512.0).ceil() as u64;
    let base = tiles.saturating_mul(129).saturating_add(65);
    let fidelity = match (high_fidelity, (w - h).abs() < 1.0) {
        (false, _) => 0,
        (true, true) => 4160,
        (true, false) => 6240,
    };
    base.saturating_add(fidelity)
}

/// The fields of an image request that set its price, from JSON or multipart.
struct ImageParams {
    prompt: String,
    n: u64,
    size: Option<String>,
    quality: Option<String>,
    stream: bool,
    partial_images: u64,
    high_fidelity: bool,
    images: Vec<InputImage>,
}

impl ImageParams {
    fn from_json(v: &Json<'_>) -> ImageParams {
        let s = |k: &str| v.get(k).and_then(Json::as_str).map(str::to_string);
        let images = match v.get("images") {
            Some(Json::Array(a)) => a.iter().map(|_| InputImage { size: None }).collect(),
            Some(_) => vec![InputImage { size: None }],
            None => Vec::new(),
        };
        ImageParams {
            prompt: s("prompt").unwrap_or_default(),
            n: uint(v, "n").unwrap_or(1).clamp(1, 10),
            size: s("size"),
            quality: s("quality"),
            stream: v.get("stream").and_then(Json::as_bool).unwrap_or(false),
            partial_images: uint(v, "partial_images").unwrap_or(0),
            high_fidelity: s("input_fidelity").as_deref() == Some("high"),
            images,
        }
    }

    fn from_multipart(m: &MultipartSummary) -> ImageParams {
        let f = |k: &str| m.fields.get(k).map(|s| s.trim().to_string());
        let num = |k: &str| f(k).and_then(|s| s.parse::<u64>().ok());
        ImageParams {
            prompt: f("prompt").unwrap_or_default(),
            n: num("n").unwrap_or(1).clamp(1, 10),
            size: f("size"),
            quality: f("quality"),
            stream: f("stream").as_deref() == Some("true"),
            partial_images: num("partial_images").unwrap_or(0),
            high_fidelity: f("input_fidelity").as_deref() == Some("high"),
            images: m.images.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A test's `json!` value as the estimator reads bodies.
    fn j(v: &serde_json::Value) -> Json<'static> {
        serde_json::from_str::<Json>(&v.to_string())
            .unwrap()
            .into_owned()
    }

    fn est() -> Estimator {
        Estimator::new(&EstimateConfig {
            default_max_output_tokens: 4096,
            ..EstimateConfig::default()
        })
        .unwrap()
    }

    fn image(v: serde_json::Value) -> Cost {
        est().estimate(
            Route::ImagesGenerations,
            v["model"].as_str(),
            Body::Json(&j(&v)),
        )
    }

    #[test]
    fn image_generations_follow_the_output_table() {
        let c = image(
            json!({"model": "gpt-image-1", "prompt": "a red fox", "quality": "high", "size": "1024x1536", "n": 2}),
        );
        assert_eq!(c.images, 2);
        assert_eq!(c.requests, 1);
        assert_eq!(c.tokens, 3 + 2 * 6240, "prompt tokens plus the table");
        let c = image(
            json!({"model": "gpt-image-1", "prompt": "", "quality": "low", "size": "1024x1024"}),
        );
        assert_eq!(c.tokens, 272);
        // Open quality and size take the dearest entry.
        let c =
            image(json!({"model": "gpt-image-1", "prompt": "", "quality": "auto", "size": "auto"}));
        assert_eq!(c.tokens, 6240);
        // Partial images add 100 each, when streamed.
        let c = image(
            json!({"model": "gpt-image-1", "prompt": "", "quality": "low", "size": "1024x1024", "stream": true, "partial_images": 3}),
        );
        assert_eq!(c.tokens, 572);
        // A size beyond the table scales by area.
        let c = image(
            json!({"model": "gpt-image-2", "prompt": "", "quality": "medium", "size": "2048x2048"}),
        );
        assert_eq!(c.tokens, 4 * 1056);
        // dall-e qualities map onto the table.
        let c =
            image(json!({"model": "dall-e-3", "prompt": "", "quality": "hd", "size": "1024x1024"}));
        assert_eq!(c.tokens, 4160);
    }

    #[test]
    fn config_tables_override_per_model() {
        let mut config = EstimateConfig::default();
        config.image_output_tokens.insert(
            "gpt-image-2*".into(),
            BTreeMap::from([("high".into(), BTreeMap::from([("1024x1024".into(), 9000)]))]),
        );
        let e = Estimator::new(&config).unwrap();
        let v = json!({"prompt": "", "quality": "high", "size": "1024x1024"});
        let c = e.estimate(
            Route::ImagesGenerations,
            Some("gpt-image-2"),
            Body::Json(&j(&v)),
        );
        assert_eq!(c.tokens, 9000);
        let c = e.estimate(
            Route::ImagesGenerations,
            Some("gpt-image-1"),
            Body::Json(&j(&v)),
        );
        assert_eq!(c.tokens, 4160);
        let mut bad = EstimateConfig::default();
        bad.image_output_tokens.insert(
            "m".into(),
            BTreeMap::from([("high".into(), BTreeMap::from([("big".into(), 1)]))]),
        );
        assert!(
            Estimator::new(&bad)
                .unwrap_err()
                .0
                .contains("image_output_tokens")
        );
    }

    #[test]
    fn edits_price_their_input_images() {
        // A 1024x1024 image: short side to 512 gives one tile.
        assert_eq!(
            input_image_tokens(
                InputImage {
                    size: Some((1024, 1024))
                },
                false
            ),
            194
        );
        // 1024x2048: 512x1024, two tiles.
        assert_eq!(
            input_image_tokens(
                InputImage {
                    size: Some((1024, 2048))
                },
                false
            ),
            323
        );
        assert_eq!(
            input_image_tokens(
                InputImage {
                    size: Some((1024, 1024))
                },
                true
            ),
            194 + 4160
        );
        assert_eq!(input_image_tokens(InputImage { size: None }, false), 323);
        let m = MultipartSummary {
            fields: HashMap::from([
                ("prompt".into(), "add a boat".into()),
                ("quality".into(), "low".into()),
                ("size".into(), "1024x1024".into()),
            ]),
            images: vec![
                InputImage {
                    size: Some((1024, 1024))
                };
                2
            ],
            digest: [0; 32],
        };
        let c = est().estimate(Route::ImagesEdits, Some("gpt-image-1"), Body::Multipart(&m));
        assert_eq!(c.tokens, 3 + 2 * 194 + 272);
        assert_eq!(c.images, 1);
    }

    #[test]
    fn text_requests_count_prompt_and_the_most_the_answer_may_take() {
        let e = est();
        let v = json!({"model": "gpt-4o", "max_tokens": 100, "n": 2, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        ]});
        let c = e.estimate(Route::ChatCompletions, Some("gpt-4o"), Body::Json(&j(&v)));
        // 2 + (4 + 8 chars) + (4 + 11 chars + an image) + 2 * 100, four characters
        // a token as OpenAI's limiter counts.
        assert_eq!(c.tokens, 2 + 6 + 772 + 200);
        let v = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        let c = e.estimate(Route::ChatCompletions, Some("gpt-4o"), Body::Json(&j(&v)));
        assert_eq!(
            c.tokens,
            2 + 5 + 4096,
            "no max_tokens: the configured default"
        );
        let v = json!({"model": "text-embedding-3-small", "input": ["hello world", "again"]});
        let c = e.estimate(
            Route::Embeddings,
            Some("text-embedding-3-small"),
            Body::Json(&j(&v)),
        );
        assert_eq!(c.tokens, 3 + 2, "11 and 5 characters");
        // Characters, not bytes; a text of one repeated letter is no cheaper.
        assert_eq!(e.count_tokens("m", "日本語の文"), 2);
        assert_eq!(e.count_tokens("m", &"a".repeat(4000)), 1000);
        // An unknown operation still gets a conservative estimate.
        let v = json!({"model": "new-thing", "question": "why"});
        let c = e.estimate(Route::Other, Some("new-thing"), Body::Json(&j(&v)));
        assert!(c.tokens >= 4096);
    }
}
