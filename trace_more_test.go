package cacheaside

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// endCheckTracer is a recTracer that also notes events arriving for a
// span that has already ended.
type endCheckTracer struct {
	recTracer
	mu    sync.Mutex
	after []string
}

func (r *endCheckTracer) Event(ctx context.Context, ev Event) {
	r.recTracer.mu.Lock()
	id, ok := ctx.Value(spanKey{}).(int)
	ended := ok && r.recTracer.spans[id-1].ended
	r.recTracer.mu.Unlock()
	if ended {
		r.mu.Lock()
		r.after = append(r.after, ev.Kind+"("+ev.Op+")")
		r.mu.Unlock()
	}
	r.recTracer.Event(ctx, ev)
}

// A GetMany key whose first read missed and whose lease round then found a
// stale value has one first-read event, miss, and then served_stale: a
// tracer that counts outcomes per key counts it once.
func TestTracerMissThenServedStale(t *testing.T) {
	mr := miniredis.RunT(t)
	b := &backend{name: "miniredis", addr: mr.Addr(), mr: mr, prefix: uniquePrefix()}
	clk := newFakeClock()
	pol := Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour}
	writer := newCache(t, b, &Options[string]{Clock: clk.Now, Policy: pol})
	tr := &recTracer{}
	c := newCache(t, b, &Options[string]{Tracer: tr, Clock: clk.Now, Policy: pol, NoReadCoalescing: true})
	ctx := context.Background()
	key := func(int) string { return b.key("k") }
	c.hooks = &testHooks{afterMiss: func(k string) {
		// Between the first read (absent) and the lease round, another
		// process writes the key, and the value goes stale.
		if err := writer.Set(ctx, k, "old"); err != nil {
			t.Error(err)
		}
		clk.Advance(2 * time.Minute)
	}}
	bl := &batchCounter{}
	if _, err := GetMany(ctx, c, []int{1}, key, bl.load); err != nil {
		t.Fatal(err)
	}
	spans := tr.take()
	if len(spans) == 0 || spans[0].call.Kind != callGetMany {
		t.Fatalf("spans %+v", spans)
	}
	got := kinds(spans[0].events)
	t.Logf("one-key GetMany events: %s; Stats misses=%d stale_served=%d", got, c.Stats().Misses, c.Stats().StaleServed)
	if got != "miss,served_stale" {
		t.Errorf("one-key GetMany events %s, want miss,served_stale", got)
	}
	if s := c.Stats(); s.Misses != 1 || s.StaleServed != 1 || s.Hits != 0 {
		t.Errorf("stats %+v", s)
	}
}

// A background refresh's Redis errors do not reach the span of the Get
// that started it (often ended by then): background work sends no events.
// Its loader call is traced, marked Background.
func TestTracerRefreshEventsNotOnGetSpan(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true, MaxRetries: -1})
	defer rdb.Close()
	clk := newFakeClock()
	tr := &endCheckTracer{}
	c, err := New(rdb, &Options[string]{Tracer: tr, Clock: clk.Now, Policy: Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour},
		Degradation: Degradation{NoBreaker: true, OpTimeout: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.Set(ctx, "k", "old"); err != nil {
		t.Fatal(err)
	}
	clk.Advance(2 * time.Minute)
	release := make(chan struct{})
	started := make(chan struct{})
	slow := func(context.Context) (string, error) { close(started); <-release; return "new", nil }
	if v, err := c.Get(ctx, "k", slow); err != nil || v != "old" {
		t.Fatalf("stale Get: %q %v", v, err)
	}
	<-started
	mr.SetError("ERR boom")
	close(release)
	waitFor(t, "the refresh", func() bool { return c.Stats().Refreshes == 1 })
	mr.SetError("")
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.after) > 0 {
		t.Errorf("a background refresh's events reached the (ended) Get span: %v", tr.after)
	}
	var bg int
	for _, sp := range tr.take() {
		if sp.call.Kind == callLoad && sp.call.Background {
			bg++
		}
	}
	if bg != 1 {
		t.Errorf("%d background load spans, want the refresh's", bg)
	}
}
