//! Overlapping windows along an axis and their jitter, as FreeScale's `get_views`
//! (`scale_attention.py`) lays them out. One implementation for both places that use them:
//! the latent views of a high-resolution step ([`super::LocalViews`], windows in latent pixels)
//! and the worker's in-UNet scale fusion (windows in attention tokens at each layer). Callers
//! bring their own generator: the two draw from different streams (ChaCha20 seeded per step
//! for the views, ChaCha8 seeded per layer in the UNet), which their renders' bytes depend on.

use rand::Rng;

/// Window starts along one axis of `dim` positions: stride steps from 0, with the count
/// `ceil((dim − win) / stride) + 1` (the reference's `int((dim − win) / stride − 1e-6) + 2`)
/// and the last window moved back so it ends at the edge. An axis no longer than the window
/// has one window at 0.
pub fn window_starts(dim: usize, win: usize, stride: usize) -> Vec<usize> {
    if dim <= win {
        return vec![0];
    }
    let n = (dim - win).div_ceil(stride) + 1;
    (0..n).map(|i| (i * stride).min(dim - win)).collect()
}

/// The reference's jitter rule for one window on one axis: an interior window moves by up to
/// ±r, the first only outwards (negative), the last only outwards (positive), a window
/// spanning the axis not at all. Nothing is drawn when the window cannot move (r = 0 or it
/// spans the axis), so a disabled axis leaves the generator's stream to the other.
pub fn jitter_offset(rng: &mut impl Rng, start: usize, win: usize, dim: usize, r: usize) -> i64 {
    let r = r as i64;
    if r == 0 {
        return 0;
    }
    let at_start = start == 0;
    let at_end = start + win == dim;
    match (at_start, at_end) {
        (false, false) => rng.random_range(-r..=r),
        (true, false) => rng.random_range(-r..=0),
        (false, true) => rng.random_range(0..=r),
        (true, true) => 0,
    }
}

/// The jittered (top, left) corner of every window of the grid `rows × cols` (starts from
/// [`window_starts`]), row-major. Windows are `win` (height, width) over an axis of `dims`;
/// the jitter ranges are `range` (height, width). Per window the width offset is drawn first,
/// then the height offset, as the reference draws them.
pub fn jittered_corners(
    rows: &[usize],
    cols: &[usize],
    win: (usize, usize),
    dims: (usize, usize),
    range: (usize, usize),
    rng: &mut impl Rng,
) -> Vec<(i64, i64)> {
    let mut corners = Vec::with_capacity(rows.len() * cols.len());
    for &top in rows {
        for &left in cols {
            let dx = jitter_offset(rng, left, win.1, dims.1, range.1);
            let dy = jitter_offset(rng, top, win.0, dims.0, range.0);
            corners.push((top as i64 + dy, left as i64 + dx));
        }
    }
    corners
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The reference's `get_views` count and placement, written as it is in Python.
    fn reference_windows(len: usize, win: usize, stride: usize) -> Vec<(usize, usize)> {
        let blocks = if len > win {
            ((len - win) as f64 / stride as f64 - 1e-6) as usize + 2
        } else {
            1
        };
        (0..blocks)
            .map(|i| {
                let start = i * stride;
                if start + win > len {
                    (len.saturating_sub(win), len)
                } else {
                    (start, start + win)
                }
            })
            .collect()
    }

    #[test]
    fn windows_cover_the_axis() {
        let ends = |len, win, stride| -> Vec<(usize, usize)> {
            window_starts(len, win, stride)
                .into_iter()
                .map(|s| (s, s + win))
                .collect()
        };
        assert_eq!(ends(8, 8, 4), vec![(0, 8)]);
        assert_eq!(ends(16, 8, 4), vec![(0, 8), (4, 12), (8, 16)]);
        assert_eq!(ends(10, 4, 2), vec![(0, 4), (2, 6), (4, 8), (6, 10)]);
        assert_eq!(
            ends(11, 4, 2),
            vec![(0, 4), (2, 6), (4, 8), (6, 10), (7, 11)]
        );
    }

    #[test]
    fn window_starts_equal_the_reference_formula() {
        for len in 1..80 {
            for win in 1..=len {
                for stride in 1..=win + 2 {
                    let ours: Vec<(usize, usize)> = window_starts(len, win, stride)
                        .into_iter()
                        .map(|s| (s, s + win))
                        .collect();
                    assert_eq!(
                        ours,
                        reference_windows(len, win, stride),
                        "{len} {win} {stride}"
                    );
                }
            }
        }
    }

    #[test]
    fn jitter_moves_edge_windows_outwards_only_and_skips_disabled_axes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let rows = window_starts(40, 16, 8);
        let cols = window_starts(24, 24, 12);
        for _ in 0..20 {
            let corners = jittered_corners(&rows, &cols, (16, 24), (40, 24), (2, 3), &mut rng);
            for (k, &(top, left)) in corners.iter().enumerate() {
                // One column spanning the width: never moved, and nothing drawn for it.
                assert_eq!(left, 0);
                let d = top - rows[k] as i64;
                assert!((-2..=2).contains(&d));
                if rows[k] == 0 {
                    assert!(d <= 0);
                }
                if rows[k] + 16 == 40 {
                    assert!(d >= 0);
                }
            }
        }
        // A zero range draws nothing: the stream is where it was.
        let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut b = a.clone();
        assert_eq!(jitter_offset(&mut a, 8, 16, 40, 0), 0);
        assert_eq!(a.random::<u64>(), b.random::<u64>());
    }
}
