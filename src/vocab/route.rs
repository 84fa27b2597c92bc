//! The API operation a request's path names.

/// The API operation a path names; Azure's `/openai/deployments/{d}/...` paths map
/// to the same operations as `/v1/...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ImagesGenerations,
    ImagesEdits,
    ImagesVariations,
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
    Models,
    Other,
}

/// The labels of the routes penstock knows an operation for.
pub(crate) const ROUTE_LABELS: [&str; 8] = [
    "images.generations",
    "images.edits",
    "images.variations",
    "chat.completions",
    "completions",
    "responses",
    "embeddings",
    "models",
];

impl Route {
    pub(crate) fn from_path(path: &str) -> Route {
        let path = path.trim_end_matches('/');
        let ends = |s: &str| path.ends_with(s);
        if ends("/images/generations") {
            Route::ImagesGenerations
        } else if ends("/images/edits") {
            Route::ImagesEdits
        } else if ends("/images/variations") {
            Route::ImagesVariations
        } else if ends("/chat/completions") {
            Route::ChatCompletions
        } else if ends("/completions") {
            Route::Completions
        } else if ends("/responses") {
            Route::Responses
        } else if ends("/embeddings") {
            Route::Embeddings
        } else if path.starts_with("/v1/models") {
            Route::Models
        } else {
            Route::Other
        }
    }

    /// A low-cardinality label for logs and metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::ImagesGenerations => "images.generations",
            Route::ImagesEdits => "images.edits",
            Route::ImagesVariations => "images.variations",
            Route::ChatCompletions => "chat.completions",
            Route::Completions => "completions",
            Route::Responses => "responses",
            Route::Embeddings => "embeddings",
            Route::Models => "models",
            Route::Other => "other",
        }
    }

    pub(crate) fn is_image(self) -> bool {
        matches!(
            self,
            Route::ImagesGenerations | Route::ImagesEdits | Route::ImagesVariations
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_from_openai_and_azure_paths() {
        assert_eq!(
            Route::from_path("/v1/images/generations"),
            Route::ImagesGenerations
        );
        assert_eq!(
            Route::from_path("/openai/deployments/img/images/generations"),
            Route::ImagesGenerations
        );
        assert_eq!(
            Route::from_path("/v1/chat/completions"),
            Route::ChatCompletions
        );
        assert_eq!(Route::from_path("/v1/completions"), Route::Completions);
        assert_eq!(Route::from_path("/v1/models/gpt-4o"), Route::Models);
        assert_eq!(Route::from_path("/v1/files"), Route::Other);
    }
}
