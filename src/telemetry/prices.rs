//! What answers cost in USD: built-in list prices, overridden or extended by
//! `[prices."glob"]`, by tokens when the answer reported `usage`, else by the image.

use std::collections::BTreeMap;

use wildmatch::WildMatch;

use crate::config::PriceConfig;
use crate::vocab::cost::ImageAsk;
use crate::vocab::usage::Usage;

/// Built-in list prices; `[prices."glob"]` in the config comes first.
fn default_prices() -> Vec<(&'static str, PriceConfig)> {
    let per_image = |low: f64, medium: f64, high: f64| {
        BTreeMap::from([
            ("low".to_string(), low),
            ("medium".to_string(), medium),
            ("high".to_string(), high),
        ])
    };
    let tokens = |input: f64, output: f64| PriceConfig {
        input_per_mtok: Some(input),
        output_per_mtok: Some(output),
        ..PriceConfig::default()
    };
    vec![
        (
            "gpt-image-1-mini*",
            PriceConfig {
                per_image: per_image(0.005, 0.011, 0.036),
                ..PriceConfig::default()
            },
        ),
        (
            "gpt-image-1.5*",
            PriceConfig {
                per_image: per_image(0.009, 0.034, 0.133),
                ..PriceConfig::default()
            },
        ),
        // ChatGPT's image model in the API; its list price is not published
        // apart: taken as gpt-image-1.5's (override with [prices."chatgpt-image-*"]).
        (
            "chatgpt-image-*",
            PriceConfig {
                per_image: per_image(0.009, 0.034, 0.133),
                ..PriceConfig::default()
            },
        ),
        (
            "gpt-image-1*",
            PriceConfig {
                input_per_mtok: Some(5.0),
                image_input_per_mtok: Some(10.0),
                output_per_mtok: Some(40.0),
                per_image: per_image(0.011, 0.042, 0.167),
            },
        ),
        (
            "dall-e-3*",
            PriceConfig {
                per_image: BTreeMap::from([("standard".into(), 0.04), ("hd".into(), 0.08)]),
                ..PriceConfig::default()
            },
        ),
        (
            "dall-e-2*",
            PriceConfig {
                per_image: BTreeMap::from([("standard".into(), 0.02)]),
                ..PriceConfig::default()
            },
        ),
        ("gpt-4o-mini*", tokens(0.15, 0.6)),
        ("gpt-4o*", tokens(2.5, 10.0)),
        ("gpt-4.1-mini*", tokens(0.4, 1.6)),
        ("gpt-4.1*", tokens(2.0, 8.0)),
        ("text-embedding-3-small*", tokens(0.02, 0.0)),
        ("text-embedding-3-large*", tokens(0.13, 0.0)),
    ]
}

pub(crate) struct Prices(Vec<(WildMatch, PriceConfig)>);

impl Prices {
    pub(crate) fn new(config: &BTreeMap<String, PriceConfig>) -> Prices {
        let mut all: Vec<(WildMatch, PriceConfig)> = config
            .iter()
            .map(|(g, p)| (WildMatch::new(g), p.clone()))
            .collect();
        all.extend(
            default_prices()
                .into_iter()
                .map(|(g, p)| (WildMatch::new(g), p)),
        );
        Prices(all)
    }

    /// USD for an answer: by its tokens when the model has token prices and the
    /// answer reported `usage`, else by the image; 0 for a model without prices.
    pub(crate) fn cost(&self, model: &str, usage: Option<&Usage>, image: Option<&ImageAsk>) -> f64 {
        self.cost_at(self.find(model), usage, image)
    }

    /// Which entry prices `model`, for [`Prices::cost_at`]: looked up once for
    /// a model seen again and again.
    pub(crate) fn find(&self, model: &str) -> Option<usize> {
        self.0.iter().position(|(g, _)| g.matches(model))
    }

    /// [`Prices::cost`] by the entry [`Prices::find`] gave.
    pub(crate) fn cost_at(
        &self,
        entry: Option<usize>,
        usage: Option<&Usage>,
        image: Option<&ImageAsk>,
    ) -> f64 {
        let Some((_, p)) = entry.and_then(|i| self.0.get(i)) else {
            return 0.0;
        };
        if let (Some(u), Some(input)) = (usage, p.input_per_mtok) {
            let text = u.input.saturating_sub(u.input_images) as f64;
            let images = u.input_images as f64;
            let output = u.output as f64;
            return (text * input
                + images * p.image_input_per_mtok.unwrap_or(input)
                + output * p.output_per_mtok.unwrap_or(0.0))
                / 1e6;
        }
        let Some(ask) = image.filter(|_| !p.per_image.is_empty()) else {
            return 0.0;
        };
        let dearest = p.per_image.values().cloned().fold(0.0, f64::max);
        let quality = match ask.quality.as_deref() {
            Some("standard") if !p.per_image.contains_key("standard") => Some("medium"),
            Some("hd") if !p.per_image.contains_key("hd") => Some("high"),
            q => q,
        };
        let per = quality
            .and_then(|q| p.per_image.get(q))
            .copied()
            .unwrap_or(dearest);
        let area = ask
            .size
            .as_deref()
            .and_then(|s| s.split_once('x'))
            .and_then(|(w, h)| Some(w.parse::<f64>().ok()? * h.parse::<f64>().ok()?))
            .map_or(1.0, |px| (px / (1024.0 * 1024.0)).max(1.0));
        ask.n as f64 * per * area
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_priced_by_tokens_when_possible_else_by_the_image() {
        let p = Prices::new(&BTreeMap::new());
        let usage = Usage {
            input: 50,
            input_images: 0,
            output: 4160,
            total: 4210,
        };
        // gpt-image-1: 50 text tokens at $5/M + 4160 image tokens at $40/M.
        let usd = p.cost("gpt-image-1", Some(&usage), None);
        assert!((usd - (50.0 * 5.0 + 4160.0 * 40.0) / 1e6).abs() < 1e-12);
        let ask = |q: &str, size: &str, n| ImageAsk {
            n,
            quality: Some(q.into()),
            size: Some(size.into()),
        };
        assert!(
            (p.cost("gpt-image-1-mini", None, Some(&ask("low", "1024x1024", 2))) - 0.010).abs()
                < 1e-12
        );
        assert!(
            (p.cost("gpt-image-1.5", None, Some(&ask("high", "1024x1024", 1))) - 0.133).abs()
                < 1e-12
        );
        // Open quality: the dearest; a larger size scales by area.
        let auto = ImageAsk {
            n: 1,
            quality: None,
            size: Some("1536x1024".into()),
        };
        assert!((p.cost("gpt-image-1-mini", None, Some(&auto)) - 0.036 * 1.5).abs() < 1e-12);
        assert!((p.cost("dall-e-3", None, Some(&ask("hd", "1024x1024", 1))) - 0.08).abs() < 1e-12);
        assert_eq!(p.cost("unknown-model", Some(&usage), None), 0.0);
        // Config comes first.
        let mine = BTreeMap::from([(
            "gpt-image-1".to_string(),
            PriceConfig {
                per_image: BTreeMap::from([("low".into(), 1.0)]),
                ..PriceConfig::default()
            },
        )]);
        let p = Prices::new(&mine);
        assert_eq!(
            p.cost(
                "gpt-image-1",
                Some(&usage),
                Some(&ask("low", "1024x1024", 3))
            ),
            3.0
        );
    }
}
