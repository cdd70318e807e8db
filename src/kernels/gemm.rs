//! A safe face on the `gemm` crate for row-major f32 slices: `dst = a * dst + b * lhs * rhs`
//! with arbitrary (positive) strides, so transposed operands cost no copy and gradients can
//! be accumulated into their buffer without a temporary.

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major (rows x cols) matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "{what}: view exceeds its buffer");
        }
    }
}

/// `dst (m x n, row-major) = (accumulate ? dst : 0) + scale * lhs (m x k) * rhs (k x n)`,
/// on `threads` threads.
pub fn matmul(dst: &mut [f32], lhs: Mat, rhs: Mat, scale: f32, accumulate: bool, threads: usize) {
    matmul_strided(dst, rhs.cols, lhs, rhs, scale, accumulate, threads)
}

/// [`matmul`] into rows `dst_row_stride` apart (>= n): a block of columns of a wider
/// row-major result, written in place.
pub fn matmul_strided(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert!(dst_row_stride >= n, "matmul: destination rows overlap");
    assert!(
        m == 0 || n == 0 || dst.len() >= (m - 1) * dst_row_stride + n,
        "matmul: destination too small"
    );
    lhs.check("matmul lhs");
    rhs.check("matmul rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_row_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the kernel touches lies inside the slices (checked above), dst does
    // not alias lhs or rhs (a &mut and two & borrows), and the strides are those of the views.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn strided_and_accumulating_products_match_the_definition() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut dst = vec![0f32; m * n];
        matmul(
            &mut dst,
            Mat::rows(&a, m, k),
            Mat::rows(&b, k, n),
            1.0,
            false,
            2,
        );
        for (x, y) in dst.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // b stored transposed (n x k) and read through a transposed view; accumulate twice.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(
            &mut dst,
            Mat::rows(&a, m, k),
            Mat::rows(&bt, n, k).t(),
            0.5,
            true,
            1,
        );
        for (x, y) in dst.iter().zip(&want) {
            assert!((x - 1.5 * y).abs() < 1e-5);
        }
        // Into columns 2..5 of a 9-wide result, in place: the other columns untouched,
        // with k = 0 (zeros) as well.
        for (kk, scale) in [(k, 1.0f32), (0, 1.0)] {
            let mut wide = vec![7f32; m * 9];
            matmul_strided(
                &mut wide[2..],
                9,
                Mat::rows(&a[..m * kk], m, kk),
                Mat::rows(&b[..kk * n], kk, n),
                scale,
                false,
                2,
            );
            for i in 0..m {
                for j in 0..9 {
                    let got = wide[i * 9 + j];
                    let want = match (j, kk) {
                        (2..=4, 0) => 0.0,
                        (2..=4, _) => want[i * n + j - 2],
                        _ => 7.0,
                    };
                    assert!(
                        (got - want).abs() < 1e-5,
                        "[{i},{j}] k={kk}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
