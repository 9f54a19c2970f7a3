package cacheaside

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// etagged is a row that carries its version, as a conditional request
// would compare it.
type etagged struct {
	ETag int64  `json:"etag"`
	Body string `json:"body"`
}

// conditional is a loader over a source that answers "unchanged" when the
// old value's version is current, as an HTTP 304 would: the loader then
// returns the old value it was shown.
type conditional struct {
	version  atomic.Int64
	full     atomic.Int64 // loads that fetched the row
	notMod   atomic.Int64 // loads the source answered "unchanged"
	shownOld atomic.Int64
}

func (s *conditional) load(ctx context.Context) (etagged, error) {
	if old, ok := Reloading[etagged](ctx); ok {
		s.shownOld.Add(1)
		if old.Value.ETag == s.version.Load() {
			s.notMod.Add(1)
			return old.Value, nil
		}
	}
	s.full.Add(1)
	v := s.version.Load()
	return etagged{ETag: v, Body: "body " + strconv.FormatInt(v, 10)}, nil
}

// A reload whose loader returns the old value keeps the entry: its life is
// extended (a new soft expiry), the counters say so, and the value is the
// same; a reload that finds a new version fills it as always.
func TestReloadingUnchanged(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[etagged]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleIfError: time.Hour, NoJitter: true, NoEarlyRefresh: true}})
		key := b.key("etag")
		var src conditional
		get := func() etagged {
			t.Helper()
			v, err := c.Get(ctx, key, src.load)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		if v := get(); v.ETag != 0 || src.shownOld.Load() != 0 {
			t.Fatalf("first Get = %+v; the miss was shown an old value %d times", v, src.shownOld.Load())
		}
		clock.Advance(2 * time.Minute) // past the TTL: the next Get reloads
		before, err := c.Peek(ctx, key)
		if err != nil || before.State != "expired" {
			t.Fatalf("Peek = %+v, %v", before, err)
		}
		if v := get(); v.ETag != 0 || v.Body != "body 0" {
			t.Fatalf("reload = %+v", v)
		}
		if src.notMod.Load() != 1 || src.full.Load() != 1 {
			t.Fatalf("%d unchanged answers and %d full loads; want 1 and 1", src.notMod.Load(), src.full.Load())
		}
		if s := c.Stats(); s.Unchanged != 1 || s.Loads != 2 || s.FillsRejected != 0 {
			t.Fatalf("stats %+v; want 1 unchanged reload of 2 loads", s)
		}
		after, err := c.Peek(ctx, key)
		if err != nil || after.State != "fresh" || after.Refreshing || after.Value != before.Value ||
			!after.Expires.Equal(clock.Now().Add(time.Minute).Truncate(time.Millisecond)) {
			t.Fatalf("after the unchanged reload: %+v, %v (now %v)", after, err, clock.Now())
		}
		get() // a hit
		if src.shownOld.Load() != 1 {
			t.Fatal("a hit called the loader")
		}

		// A new version: filled as always.
		src.version.Store(1)
		clock.Advance(2 * time.Minute)
		if v := get(); v.ETag != 1 {
			t.Fatalf("reload after a change = %+v", v)
		}
		if s := c.Stats(); s.Unchanged != 1 || src.full.Load() != 2 {
			t.Fatalf("after a changed reload: %d unchanged, %d full loads", s.Unchanged, src.full.Load())
		}

		// GetOptions.Reload shows the old value too.
		if v, err := c.Get(ctx, key, src.load, GetOptions{Reload: true}); err != nil || v.ETag != 1 {
			t.Fatal(v, err)
		}
		if s := c.Stats(); s.Unchanged != 2 {
			t.Fatalf("a Reload whose value came back the same: %d unchanged, want 2", s.Unchanged)
		}
	})
}

// A background refresh (stale-while-revalidate) shows the old value and
// keeps it; an invalidation during that reload makes the keep fail, as it
// makes a fill fail.
func TestReloadingBackground(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[etagged]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoJitter: true, NoEarlyRefresh: true}})
		key := b.key("etag-bg")
		var src conditional
		if _, err := c.Get(ctx, key, src.load); err != nil {
			t.Fatal(err)
		}
		clock.Advance(2 * time.Minute)
		if _, err := c.Get(ctx, key, src.load); err != nil { // stale: served, refreshed in the background
			t.Fatal(err)
		}
		waitFor(t, "the background refresh to keep the entry", func() bool { return c.Stats().Unchanged == 1 })
		if p, err := c.Peek(ctx, key); err != nil || p.State != "fresh" {
			t.Fatalf("after the refresh: %+v, %v", p, err)
		}

		// An invalidation while the reload runs: the keep is refused and
		// nothing older than the invalidation stays.
		inval := func(ctx context.Context) (etagged, error) {
			if _, err := c.Invalidate(context.WithoutCancel(ctx), key); err != nil {
				return etagged{}, err
			}
			return src.load(ctx)
		}
		clock.Advance(2 * time.Minute)
		if _, err := c.Get(ctx, key, inval); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the refused keep", func() bool { return c.Stats().FillsRejected == 1 })
		if s := c.Stats(); s.Unchanged != 1 {
			t.Fatalf("%d unchanged; the refused keep was counted", s.Unchanged)
		}
		if p, err := c.Peek(ctx, key); err != nil || p.State != "absent" {
			t.Fatalf("after the refused keep: %+v, %v; want the key gone", p, err)
		}
	})
}

// GetMany's batch loader sees each reloaded id's old value (ReloadingOf);
// the ids it returns unchanged are kept, the others filled.
func TestReloadingBatch(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[etagged]{Clock: clock.Now, Policy: Policy{TTL: time.Minute, StaleIfError: time.Hour, NoJitter: true, NoEarlyRefresh: true}})
		keyOf := func(id int) string { return b.key("etag-many:") + strconv.Itoa(id) }
		versions := map[int]int64{1: 0, 2: 0, 3: 0}
		var shown atomic.Int64
		load := func(ctx context.Context, ids []int) (map[int]etagged, error) {
			m := map[int]etagged{}
			for _, id := range ids {
				if old, ok := ReloadingOf[int, etagged](ctx, id); ok {
					shown.Add(1)
					if old.Value.ETag == versions[id] {
						m[id] = old.Value
						continue
					}
				}
				m[id] = etagged{ETag: versions[id], Body: strconv.Itoa(id)}
			}
			return m, nil
		}
		ids := []int{1, 2, 3}
		if _, err := GetMany(ctx, c, ids, keyOf, load); err != nil || shown.Load() != 0 {
			t.Fatal(err, shown.Load())
		}
		versions[2] = 1
		clock.Advance(2 * time.Minute)
		got, err := GetMany(ctx, c, ids, keyOf, load)
		if err != nil || got[1].ETag != 0 || got[2].ETag != 1 || got[3].ETag != 0 {
			t.Fatalf("GetMany = %v, %v", got, err)
		}
		if shown.Load() != 3 {
			t.Fatalf("the batch loader was shown %d old values, want 3", shown.Load())
		}
		if s := c.Stats(); s.Unchanged != 2 {
			t.Fatalf("%d unchanged, want 2 (ids 1 and 3)", s.Unchanged)
		}
		for _, id := range ids {
			if p, err := c.Peek(ctx, keyOf(id)); err != nil || p.State != "fresh" || p.Value.ETag != versions[id] {
				t.Fatalf("id %d after the batch reload: %+v, %v", id, p, err)
			}
		}
	})
}

// Outside a reload, Reloading reports nothing.
func TestReloadingOutside(t *testing.T) {
	if _, ok := Reloading[string](context.Background()); ok {
		t.Fatal("Reloading outside a loader")
	}
	if _, ok := ReloadingOf[int, string](context.Background(), 1); ok {
		t.Fatal("ReloadingOf outside a loader")
	}
}
