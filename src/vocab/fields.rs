//! One field of a request body rewritten, the rest sent byte for byte: the
//! `model` a fallback or an Azure deployment names, in a JSON body (its
//! top-level member) or a multipart form (its text part).

/// `body` with its `model` set to `to`, for a body of `content_type`;
/// `None` when it has no such field penstock can rewrite.
pub(crate) fn with_model(body: &[u8], content_type: Option<&str>, to: &str) -> Option<Vec<u8>> {
    let content_type = content_type.unwrap_or("");
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type).ok()?;
        return with_form_field(body, &boundary, "model", to);
    }
    super::json::with_top_level_string(body, "model", to)
}

/// A multipart body with the value of its text field `name` replaced.
fn with_form_field(body: &[u8], boundary: &str, name: &str, to: &str) -> Option<Vec<u8>> {
    let delimiter = format!("--{boundary}");
    let wanted = format!("name=\"{name}\"");
    let mut at = find(body, delimiter.as_bytes(), 0)?;
    loop {
        let head_start = at + delimiter.len();
        // The closing delimiter: no such field.
        if body.get(head_start..head_start + 2) == Some(b"--") {
            return None;
        }
        let head_end = find(body, b"\r\n\r\n", head_start)?;
        let value_start = head_end + 4;
        let next = find(body, format!("\r\n{delimiter}").as_bytes(), value_start)?;
        let head = &body[head_start..head_end];
        let disposition = std::str::from_utf8(head).ok().and_then(|h| {
            h.split("\r\n")
                .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
        });
        let is_it = disposition
            .is_some_and(|d| d.split(';').any(|p| p.trim() == wanted) && !d.contains("filename"));
        if is_it {
            let mut out = Vec::with_capacity(body.len() + to.len());
            out.extend_from_slice(&body[..value_start]);
            out.extend_from_slice(to.as_bytes());
            out.extend_from_slice(&body[next..]);
            return Some(out);
        }
        at = next + 2;
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(model_first: bool) -> Vec<u8> {
        let model =
            "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n";
        let image = "--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"model.png\"\r\nContent-Type: image/png\r\n\r\nname=\"model\"\r\n";
        let prompt =
            "--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na lighthouse\r\n";
        let parts = match model_first {
            true => [model, image, prompt],
            false => [image, prompt, model],
        };
        format!("{}--XyZ--\r\n", parts.concat()).into_bytes()
    }

    #[test]
    fn a_forms_model_is_rewritten_and_nothing_else() {
        let ct = Some("multipart/form-data; boundary=XyZ");
        for first in [true, false] {
            let body = form(first);
            let out = with_model(&body, ct, "gpt-image-1-mini").unwrap();
            let expected = String::from_utf8(body)
                .unwrap()
                .replace("\r\n\r\ngpt-image-1\r\n", "\r\n\r\ngpt-image-1-mini\r\n");
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        // A file named like the field is not the field.
        let no_model = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m\"\r\n\r\nx\r\n--XyZ--\r\n";
        assert_eq!(with_model(no_model, ct, "m"), None);
        assert_eq!(with_model(b"garbage", ct, "m"), None);
    }

    #[test]
    fn a_json_bodys_top_level_model_is_rewritten() {
        let out = with_model(br#"{"model":"a","n":1}"#, Some("application/json"), "b").unwrap();
        assert_eq!(out, br#"{"model":"b","n":1}"#);
    }
}
