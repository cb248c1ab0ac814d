//! Pictures: a running job's preview (from the store), finished images streamed from the
//! coordinator's output folder, and their Deep Zoom pyramids (`assemble/dzi.rs` writes
//! `N.dzi` and `N_files/LEVEL/COL_ROW.png` beside `N.png`) a tile at a time, so the viewer
//! never loads a large picture whole. Files are opened without following links
//! (`cluster/outputs.rs`), from names built here out of checked numbers.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tessera_proto::v1::coordinator_server::Coordinator;
use tessera_proto::v1::JobRef;

use super::api::{json, ApiError};
use super::Dash;
use crate::assemble::dzi;
use crate::cluster::jobs::JobRecord;
use crate::cluster::outputs;

/// Bytes read per chunk of a streamed file.
const CHUNK: usize = 256 << 10;
/// The largest picture the viewer may show whole when it has no pyramid.
const WHOLE_LIMIT: u32 = 4096;

type Answer = Result<Response, ApiError>;

fn not_found(what: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, what)
}

fn png(bytes: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from(bytes),
    )
        .into_response()
}

/// `GET /api/jobs/ID/preview.png`: the running job's latest preview.
pub async fn preview(State(dash): State<Arc<Dash>>, Path(id): Path<String>) -> Answer {
    let req = tonic::Request::new(JobRef { job_id: id.clone() });
    let bytes = dash.service.get_preview(req).await?.into_inner().png;
    if bytes.is_empty() {
        return Err(not_found(format!("job {id} has no preview yet")));
    }
    Ok(png(bytes))
}

/// The job and image `n` of it, finished.
async fn finished(dash: &Dash, id: &str, n: &str) -> Result<(JobRecord, u32), ApiError> {
    let (_, record, _) = dash.record(id).await?;
    let n: u32 = n
        .parse()
        .map_err(|_| not_found(format!("{n:?} is not an image number")))?;
    if n >= record.images_done {
        return Err(not_found(format!(
            "image {n} of job {id} is not finished ({} of {} are)",
            record.images_done, record.count
        )));
    }
    Ok((record, n))
}

/// Opens `output_dir/ID/parts…` off the async threads.
async fn open(dash: &Dash, id: &str, parts: Vec<String>) -> Result<tokio::fs::File, ApiError> {
    let dir = dash.runner()?.opts.output_dir.clone();
    let id = id.to_string();
    let opened = tokio::task::spawn_blocking(move || {
        let mut all = vec![id.as_str()];
        all.extend(parts.iter().map(String::as_str));
        outputs::open_under(&dir, &all)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    opened
        .map(tokio::fs::File::from_std)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => not_found("the file is not there (expired?)".into()),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        })
}

/// A file as a streamed body, a chunk at a time.
fn stream(file: tokio::fs::File) -> Body {
    let chunks = futures::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Body::from_stream(chunks)
}

/// `GET /api/jobs/ID/images/N` (`?download` to save it): the finished PNG, streamed.
pub async fn image(
    State(dash): State<Arc<Dash>>,
    Path((id, n)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Answer {
    let (record, n) = finished(&dash, &id, &n).await?;
    let file = open(&dash, &record.id, vec![format!("{n}.png")]).await?;
    let mut res = (
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        stream(file),
    )
        .into_response();
    if query.is_some_and(|q| q.split('&').any(|p| p == "download")) {
        let name = crate::cluster::runner::output_name(&record.id, n, record.count);
        let value = format!("attachment; filename=\"{name}\"");
        if let Ok(v) = HeaderValue::from_str(&value) {
            res.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(res)
}

/// `GET /api/jobs/ID/images/N/dzi`: how the viewer reads the picture — its size and its
/// pyramid's geometry, or that it has none (then it may show the PNG whole, if small).
pub async fn dzi(State(dash): State<Arc<Dash>>, Path((id, n)): Path<(String, String)>) -> Answer {
    let (record, n) = finished(&dash, &id, &n).await?;
    let (w, h) = (record.spec.width, record.spec.height);
    let pyramid = open(&dash, &record.id, vec![format!("{n}.dzi")])
        .await
        .is_ok();
    let body = serde_json::json!({
        "width": w,
        "height": h,
        "pyramid": pyramid,
        "tile": dzi::TILE,
        "overlap": dzi::OVERLAP,
        "max_level": dzi::max_level(w as usize, h as usize),
        "whole": !pyramid && w.max(h) <= WHOLE_LIMIT,
    });
    Ok(json(StatusCode::OK, &body))
}

/// `COL_ROW.png` as two numbers, or `None`.
fn tile_name(tile: &str) -> Option<(u32, u32)> {
    let (col, row) = tile.strip_suffix(".png")?.split_once('_')?;
    Some((col.parse().ok()?, row.parse().ok()?))
}

/// `GET /api/jobs/ID/images/N/tiles/LEVEL/COL_ROW.png`: one tile of the pyramid.
pub async fn tile(
    State(dash): State<Arc<Dash>>,
    Path((id, n, level, tile)): Path<(String, String, String, String)>,
) -> Answer {
    let (record, n) = finished(&dash, &id, &n).await?;
    let level: u32 = level
        .parse()
        .map_err(|_| not_found(format!("{level:?} is not a level")))?;
    let (col, row) =
        tile_name(&tile).ok_or_else(|| not_found(format!("{tile:?} is not a tile")))?;
    let parts = vec![
        format!("{n}_files"),
        level.to_string(),
        format!("{col}_{row}.png"),
    ];
    let file = open(&dash, &record.id, parts).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        stream(file),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_names_are_two_numbers_and_nothing_else() {
        assert_eq!(tile_name("3_7.png"), Some((3, 7)));
        for bad in [
            "3_7.jpg",
            "../1_1.png",
            "1_1_1.png",
            "a_1.png",
            "1.png",
            "_1.png",
        ] {
            assert_eq!(tile_name(bad), None, "{bad}");
        }
    }
}
