"""Sums over groups of sparse rows, split by column: the columns most groups touch dense,
the others as the pairs of entries each group has.

The exact finish eliminates its largest factor group by group; each group's coupling to
the rest (the fixed effects, the other factors' levels) is a few rows of a wide matrix
that is dense in the fixed effects (centred features touch every group) and sparse in the
levels. `SplitRows` sums quadratic forms and weighted Gram matrices over the groups at the
cost of the dense block plus each group's pairs of sparse entries; `reffects.finish` and
`reffects.joint_posterior` use it.

Example:
    >>> from scipy import sparse
    >>> rows = sparse.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))
    >>> SplitRows(rows, 1).quadratic(np.eye(3))[:, 0, 0].tolist()  # |c_g|^2
    [5.0, 2.0]
"""

import copy

import numpy as np
from scipy import sparse

DENSE_SHARE = 0.1
"""A column nonzero in at least this share of the groups is held dense."""


def batched_product(left, right):
    """left_g @ right_g for `(G, d, e)` and `(G, e, m)` with small d and e, as e
    broadcast products (numpy's batched matmul of 2 x 2 by 2 x 600 blocks costs 10x more)."""
    result = left[:, :, :1] * right[:, :1, :]
    for j in range(1, left.shape[2]):
        result += left[:, :, j : j + 1] * right[:, j : j + 1, :]
    return result


class SplitRows:
    """A `(G d, m)` sparse matrix of G groups' d rows each, split by column: the columns
    nonzero in at least `DENSE_SHARE` of the groups as a dense `(G, d, m_d)`
    block, the others as a sparse matrix. Gives the groups' quadratic forms and weighted
    Gram matrices at the cost of the dense block plus each group's pairs of sparse entries.

    Example:
        >>> rows = sparse.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))
        >>> SplitRows(rows, 2).quadratic(np.eye(3))[0].tolist()  # c_g c_g'
        [[5.0, 2.0], [2.0, 2.0]]
    """

    def __init__(self, rows, d):
        self.d, self.num_groups, self.width = d, rows.shape[0] // d, rows.shape[1]
        rows = sparse.csr_matrix(rows)
        rows.sum_duplicates()
        group = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr)) // d
        touched = np.unique(group.astype("int64") * self.width + rows.indices)  # (g, column)
        share = np.bincount(touched % self.width, minlength=self.width) / max(self.num_groups, 1)
        dense = share >= DENSE_SHARE
        self.dense_columns, self.sparse_columns = np.flatnonzero(dense), np.flatnonzero(~dense)
        self.dense = rows[:, self.dense_columns].toarray()
        self.dense = self.dense.reshape(self.num_groups, d, len(self.dense_columns))
        self.sparse = rows[:, self.sparse_columns].tocsr()
        self.sparse.sort_indices()
        self.pairs = self._pairs()
        self.targets = self._targets()

    def scaled(self, scale):
        """The same rows with column j times `scale[j]` (the pattern and pairs shared)."""
        result = copy.copy(self)
        result.dense = self.dense * scale[self.dense_columns]
        result.sparse = self.sparse.copy()
        result.sparse.data = self.sparse.data * scale[self.sparse_columns][self.sparse.indices]
        return result

    def _pairs(self):
        """Each pair of the sparse part's entries in one group, (e1, e2) with e1 <= e2 in
        storage order, with e1's and e2's row within the group."""
        part, d = self.sparse, self.d
        starts = np.ascontiguousarray(part.indptr[::d])
        lengths = np.diff(starts)  # entries per group
        group = np.repeat(np.arange(self.num_groups), lengths)
        following = starts[group + 1] - np.arange(part.nnz)  # e, e + 1, ..., group's end
        first = np.repeat(np.arange(part.nnz), following)
        second = (
            first + np.arange(len(first)) - np.repeat(np.cumsum(following) - following, following)
        )
        row = np.repeat(np.arange(part.shape[0]), np.diff(part.indptr)) % d
        return group[first], first, second, row[first], row[second]

    def _targets(self):
        """Where each pair's product goes in the flattened `(G, d, d)`: (g, a1, a2), and
        for pairs of two entries also (g, a2, a1)."""
        group, first, second, row_a, row_b = self.pairs
        apart = first != second
        forward = (group * self.d + row_a) * self.d + row_b
        backward = ((group * self.d + row_b) * self.d + row_a)[apart]
        return forward, backward, apart

    def quadratic(self, matrix) -> np.ndarray:
        """c_ga' matrix c_gb for each group's rows a, b: `(G, d, d)`."""
        dense, other = self.dense_columns, self.sparse_columns
        rows = self.num_groups * self.d
        full = self.dense.reshape(rows, len(dense))
        result = np.einsum(
            "gam,gbm->gab",
            (full @ matrix[np.ix_(dense, dense)]).reshape(self.dense.shape),
            self.dense,
        )
        mixed = np.asarray(self.sparse @ matrix[np.ix_(other, dense)]).reshape(self.dense.shape)
        cross_term = np.einsum("gam,gbm->gab", mixed, self.dense)
        result += cross_term + np.swapaxes(cross_term, 1, 2)
        _, first, second, _, _ = self.pairs
        forward, backward, apart = self.targets
        columns = other[self.sparse.indices]
        values = self.sparse.data[first] * self.sparse.data[second]
        values *= matrix[columns[first], columns[second]]  # matrix is symmetric
        sums = np.bincount(forward, values, minlength=result.size)
        sums += np.bincount(backward, values[apart], minlength=result.size)
        return result + sums.reshape(result.shape)

    def pair_gram(self):
        """The sparse part's pairs as `(keys, P)`: P's product with the groups' flattened
        d x d weights K holds sum_g c_g' K_g c_g at the flattened `(m, m)` positions `keys`
        (only the column pairs some group has: a row per pair, not per entry of m x m)."""
        _, first, second, _, _ = self.pairs
        forward, backward, apart = self.targets
        columns = self.sparse_columns[self.sparse.indices].astype("int64")
        low, high = columns[first], columns[second]
        positions = np.concatenate([low * self.width + high, (high * self.width + low)[apart]])
        keys, pair = np.unique(positions, return_inverse=True)
        values = self.sparse.data[first] * self.sparse.data[second]
        matrix = sparse.csr_matrix(
            (np.concatenate([values, values[apart]]), (pair, np.concatenate([forward, backward]))),
            shape=(len(keys), self.num_groups * self.d * self.d),
        )
        return keys, matrix

    def weighted_gram(self, weights, pairs) -> np.ndarray:
        """sum_g c_g' K_g c_g for `(G, d, d)` weights K, `(m, m)`; `pairs` from `pair_gram`."""
        dense, other = self.dense_columns, self.sparse_columns
        rows = self.num_groups * self.d
        weighted = batched_product(weights, self.dense).reshape(rows, len(dense))
        gram = np.zeros((self.width, self.width))
        keys, matrix = pairs
        gram.reshape(-1)[keys] = matrix @ weights.reshape(-1)
        gram[np.ix_(dense, dense)] = self.dense.reshape(rows, len(dense)).T @ weighted
        mixed = np.asarray(self.sparse.T @ weighted)
        gram[np.ix_(other, dense)] = mixed
        gram[np.ix_(dense, other)] = mixed.T
        return gram
