// Reloads that see the old value: a loader called to replace a cached
// value finds it in its context (Reloading, ReloadingOf), and a reload
// whose value comes back the same extends the entry's life without sending
// the value again (keep.lua).

package cacheaside

import (
	"bytes"
	"context"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// reloadingKey is the context key of the old value(s) a load replaces: a
// Peeked[T] for a Get's loader, a map[int]Peeked[T] by position for a
// batch (turned into a map[K]Peeked[T] by GetMany's source).
type reloadingKey struct{}

// Reloading returns, inside a Get's loader, the cached value the load is
// about to replace, with its state, the end of its TTL and its load time,
// when the load is a reload of a value: an early refresh, a
// stale-while-revalidate refresh, a reload after the stale windows began,
// or a Get with GetOptions.Reload. A loader can then make a conditional
// request (an ETag or a version column kept in the value, If-Modified-Since
// from a timestamp in it) and, when the source says nothing changed,
// return the old value: a reload whose value encodes to the same bytes as
// the old one extends the entry's life without sending the value to Redis
// again, and Stats.Unchanged counts it. ok is false for a plain miss (the
// loader loads as always) and outside a loader.
func Reloading[T any](ctx context.Context) (old Peeked[T], ok bool) {
	p, ok := ctx.Value(reloadingKey{}).(Peeked[T])
	return p, ok
}

// ReloadingOf is Reloading for a GetMany's batch loader: the cached value
// the load of id is about to replace, if it is a reload.
func ReloadingOf[K comparable, T any](ctx context.Context, id K) (old Peeked[T], ok bool) {
	m, _ := ctx.Value(reloadingKey{}).(map[K]Peeked[T])
	p, ok := m[id]
	return p, ok
}

// withReloading returns ctx carrying the old values of the ops that are
// reloads (see Reloading), or ctx itself when none is.
func (s source[T]) withReloading(ctx context.Context, c *Cache[T], ops []*keyOp[T]) context.Context {
	now := c.opts.Clock()
	if s.one != nil {
		if op := ops[0]; op.reload() {
			return context.WithValue(ctx, reloadingKey{}, c.peeked(&op.vw, now))
		}
		return ctx
	}
	var olds map[int]Peeked[T]
	for _, op := range ops {
		if op.reload() {
			if olds == nil {
				olds = make(map[int]Peeked[T])
			}
			olds[op.idx] = c.peeked(&op.vw, now)
		}
	}
	if olds == nil {
		return ctx
	}
	return context.WithValue(ctx, reloadingKey{}, olds)
}

// reloadingBatch turns the old values a batch carries by position into a
// map by id, for ReloadingOf.
func reloadingBatch[K comparable, T any](ctx context.Context, idx []int, ids []K) context.Context {
	byIdx, ok := ctx.Value(reloadingKey{}).(map[int]Peeked[T])
	if !ok {
		return ctx
	}
	m := make(map[K]Peeked[T], len(byIdx))
	for i, j := range idx {
		if p, ok := byIdx[j]; ok {
			m[ids[i]] = p
		}
	}
	return context.WithValue(ctx, reloadingKey{}, m)
}

// peeked is the Peeked of a value vw holds, judged at now.
func (c *Cache[T]) peeked(vw *view[T], now time.Time) Peeked[T] {
	p := Peeked[T]{Value: vw.v, Refreshing: vw.e.Kind == envelope.Refreshing}
	if !p.Refreshing {
		p.LoadTime = time.Duration(vw.e.LoadMillis) * time.Millisecond
	}
	p.setWritten(vw.e.Written, now)
	pol := &c.opts.Policy
	switch soft := vw.e.SoftExpiry; {
	case soft == 0:
		p.State = "fresh"
		return p
	case now.UnixMilli() < soft:
		p.State = "fresh"
	case now.UnixMilli() < soft+pol.StaleWhileRevalidate.Milliseconds():
		p.State = "stale"
	default:
		p.State = "expired"
	}
	p.Expires = time.UnixMilli(vw.e.SoftExpiry)
	return p
}

// unchanged reports whether entry, the fill of a reload of op, holds the
// payload op's old value encodes to: the reload can keep the entry
// (keep.lua) instead of filling it.
func (c *Cache[T]) unchanged(op *keyOp[T], entry []byte) bool {
	if !op.reload() {
		return false
	}
	old, err := c.opts.Codec.Marshal(op.vw.v)
	return err == nil && bytes.Equal(old, entry[envelope.HeaderSize:])
}
