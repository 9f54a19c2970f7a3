package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

type task struct {
	ID    int      `json:"id" msgpack:"id"`
	Title string   `json:"title" msgpack:"title"`
	Tags  []string `json:"tags" msgpack:"tags"`
}

var ctx = context.Background()

func TestInspectValue(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[task]{Policy: cacheaside.Policy{TTL: time.Minute, NoJitter: true}})
		key := b.ks.Key("42")
		_, err := c.Get(ctx, key, func(context.Context) (task, error) {
			time.Sleep(20 * time.Millisecond)
			return task{ID: 42, Title: "write docs", Tags: []string{"a", "b"}}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		raw, err := b.rdb.Get(ctx, key).Bytes()
		if err != nil {
			t.Fatal(err)
		}
		in := b.inspectJSON(t, key)
		if in.Kind != "value" || in.Codec != "json" || in.CodecID != 1 {
			t.Errorf("kind %q codec %q (%d), want value json (1)", in.Kind, in.Codec, in.CodecID)
		}
		if want := hex.EncodeToString(raw[envelope.TokenOffset : envelope.TokenOffset+envelope.TokenSize]); in.Token != want {
			t.Errorf("token %s, want %s", in.Token, want)
		}
		if in.SoftExpiry == nil || in.SoftExpiry.InMs <= 50_000 || in.SoftExpiry.InMs > 60_000 {
			t.Errorf("soft expiry %+v, want about a minute ahead", in.SoftExpiry)
		}
		if in.PTTLMillis <= 50_000 || in.PTTLMillis > 60_000 {
			t.Errorf("pttl %dms, want about a minute", in.PTTLMillis)
		}
		if in.LoadMillis == nil || *in.LoadMillis < 20 {
			t.Errorf("load time %v, want ≥ 20ms", in.LoadMillis)
		}
		if in.Written == nil || in.Written.InMs > 0 || in.Written.InMs < -10_000 {
			t.Errorf("written %+v, want within the last 10s", in.Written)
		}
		if in.Namespace != nil {
			t.Errorf("namespace %+v, want none", in.Namespace)
		}
		if in.Size != len(raw) || in.PayloadSize != len(raw)-envelope.HeaderSize {
			t.Errorf("size %d payload %d, want %d and %d", in.Size, in.PayloadSize, len(raw), len(raw)-envelope.HeaderSize)
		}
		assertJSON(t, in.Value, `{"id":42,"title":"write docs","tags":["a","b"]}`)
		out := b.ok(t, "inspect", key)
		mustContain(t, out, "kind         value\n", "codec        json (1)\n", "token        "+in.Token,
			" left)\n", " ago)\n", "namespace    not namespaced\n", `value        {"id":42,"title":"write docs","tags":["a","b"]}`)
	})
}

func TestInspectMsgpack(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[task]{Codec: cacheaside.Msgpack[task]()})
		key := b.ks.Key("7")
		if _, err := c.Get(ctx, key, func(context.Context) (task, error) { return task{ID: 7, Title: "ship", Tags: []string{"x"}}, nil }); err != nil {
			t.Fatal(err)
		}
		in := b.inspectJSON(t, key)
		if in.Codec != "msgpack" || in.CodecID != 2 {
			t.Errorf("codec %q (%d), want msgpack (2)", in.Codec, in.CodecID)
		}
		assertJSON(t, in.Value, `{"id":7,"title":"ship","tags":["x"]}`)

		// Maps with integer keys have no JSON form of their own: keys are printed.
		m := newCache(t, b, &cacheaside.Options[map[int]string]{Name: b.cacheName + "-m", Codec: cacheaside.Msgpack[map[int]string]()})
		mkey := b.ks.Key("m")
		if _, err := m.Get(ctx, mkey, func(context.Context) (map[int]string, error) { return map[int]string{1: "a", 2: "b"}, nil }); err != nil {
			t.Fatal(err)
		}
		assertJSON(t, b.inspectJSON(t, mkey).Value, `{"1":"a","2":"b"}`)
	})
}

// TestInspectHostileMsgpack: a payload whose header declares 2^32-1
// elements in 5 bytes is reported as not valid msgpack; decoding it as it
// is would ask the runtime for 64 GiB and kill the command.
func TestInspectHostileMsgpack(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		key := b.ks.Key("hostile")
		raw := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: wire.FormatMsgpack, Token: envelope.Token{1}, Payload: []byte{0xdd, 0xff, 0xff, 0xff, 0xff}})
		b.rdb.Set(ctx, key, raw, time.Minute)
		in := b.inspectJSON(t, key)
		if !strings.Contains(in.ValueError, "not valid msgpack") || in.Value != nil {
			t.Errorf("value %s, value_error %q; want the payload refused", in.Value, in.ValueError)
		}
	})
}

// TestInspectMaxBytes: an entry larger than --max-bytes is described from
// its header (kind, codec, size) without reading or decoding the value.
func TestInspectMaxBytes(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache[string](t, b, nil)
		key := b.ks.Key("big")
		big := strings.Repeat("x", 200_000)
		if _, err := c.Get(ctx, key, func(context.Context) (string, error) { return big, nil }); err != nil {
			t.Fatal(err)
		}
		var in inspection
		out := b.ok(t, "inspect", "--json", "--max-bytes", "1000", key)
		if err := json.Unmarshal([]byte(out), &in); err != nil {
			t.Fatal(err)
		}
		if in.Kind != "value" || in.Codec != "json" || in.Size != 200_002+envelope.HeaderSize || in.PayloadSize != 200_002 || in.Value != nil ||
			!strings.Contains(in.ValueError, "over --max-bytes 1000") {
			t.Errorf("inspect --max-bytes 1000: kind %s, codec %s, size %d, payload %d, value_error %q", in.Kind, in.Codec, in.Size, in.PayloadSize, in.ValueError)
		}
		if got := b.inspectJSON(t, key); len(got.Value) != 200_002 {
			t.Errorf("with the default --max-bytes the value is %d bytes, want 200002", len(got.Value))
		}
		if r := b.cli(t, "inspect", "--max-bytes", "10", key); r.code != exitUsage {
			t.Errorf("--max-bytes 10: exit %d, want %d", r.code, exitUsage)
		}
	})
}

func assertJSON(t *testing.T, got json.RawMessage, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("value %s: %v", got, err)
	}
	_ = json.Unmarshal([]byte(want), &w)
	if !reflect.DeepEqual(g, w) {
		t.Errorf("value %s, want %s", got, want)
	}
}

// rawCodec is a custom codec: the CLI can only show its bytes.
type rawCodec struct{}

func (rawCodec) Format() byte                     { return 200 }
func (rawCodec) Marshal(v []byte) ([]byte, error) { return v, nil }
func (rawCodec) Unmarshal(data []byte, v *[]byte) error {
	*v = append([]byte(nil), data...)
	return nil
}

func TestInspectCustomCodec(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[[]byte]{Codec: rawCodec{}})
		key := b.ks.Key("bin")
		if _, err := c.Get(ctx, key, func(context.Context) ([]byte, error) { return []byte("\x00\x01bin"), nil }); err != nil {
			t.Fatal(err)
		}
		in := b.inspectJSON(t, key)
		if in.Codec != "custom" || in.CodecID != 200 || in.ValueHex != "000162696e" || in.Value != nil {
			t.Errorf("codec %q (%d), value %s, hex %q; want custom (200), no value, hex 000162696e", in.Codec, in.CodecID, in.Value, in.ValueHex)
		}
		mustContain(t, b.ok(t, "inspect", key), "codec        custom (200)\n", "value        5 bytes of codec 200, hex 000162696e\n")
	})
}

func TestInspectTombstone(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[task]{Policy: cacheaside.Policy{NegativeTTL: 30 * time.Second}})
		key := b.ks.Key("404")
		_, err := c.Get(ctx, key, func(context.Context) (task, error) { return task{}, cacheaside.ErrNotFound })
		if !errors.Is(err, cacheaside.ErrNotFound) {
			t.Fatalf("Get: %v, want ErrNotFound", err)
		}
		in := b.inspectJSON(t, key)
		if in.Kind != "tombstone" || in.Size != envelope.HeaderSize || in.PayloadSize != 0 || in.Value != nil {
			t.Errorf("%+v, want a 40-byte tombstone without value", in)
		}
		if in.PTTLMillis <= 0 || in.PTTLMillis > 30_000 {
			t.Errorf("pttl %dms, want the negative TTL", in.PTTLMillis)
		}
		mustContain(t, b.ok(t, "inspect", key), "kind         tombstone\n", "value        none: the loader said the item does not exist\n")
	})
}

func TestInspectLease(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &cacheaside.Options[string]{LeaseTTL: 5 * time.Second})
		key := b.ks.Key("slow")
		started, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		var wg sync.WaitGroup
		defer wg.Wait()
		defer once.Do(func() { close(release) })
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = c.Get(ctx, key, func(context.Context) (string, error) {
				close(started)
				<-release
				return "done", nil
			})
		}()
		<-started
		in := b.inspectJSON(t, key)
		if in.Kind != "lease" || in.Contended == nil || *in.Contended || in.Value != nil {
			t.Errorf("%+v, want an uncontended lease", in)
		}
		if in.PTTLMillis <= 0 || in.PTTLMillis > 5000 {
			t.Errorf("pttl %dms, want at most the 5s LeaseTTL", in.PTTLMillis)
		}
		mustContain(t, b.ok(t, "inspect", key), "kind         lease\n", "contended    no\n", "value        none yet: a load is in progress\n")

		// Another process asks for the key: it waits, and marks the lease contended.
		other := newCache(t, b, &cacheaside.Options[string]{})
		var otherGot atomic.Value
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := other.Get(ctx, key, func(context.Context) (string, error) { return "other", nil })
			otherGot.Store([2]any{v, err})
		}()
		waitFor(t, "a contended lease", func() bool {
			in := b.inspectJSON(t, key)
			return in.Contended != nil && *in.Contended
		})
		mustContain(t, b.ok(t, "inspect", key), "contended    yes")
		once.Do(func() { close(release) })
		wg.Wait()
		if got := otherGot.Load().([2]any); got[0] != "done" || got[1] != nil {
			t.Errorf("the waiting Get returned %v, want the holder's fill", got)
		}
		if in := b.inspectJSON(t, key); in.Kind != "value" || string(in.Value) != `"done"` { // a JSON string: no indentation
			t.Errorf("after the fill: %s %s, want value \"done\"", in.Kind, in.Value)
		}
	})
}

// fakeClock is an Options.Clock the test moves.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

func TestInspectRefreshing(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		clk := &fakeClock{}
		clk.ns.Store(time.Now().Add(-2 * time.Minute).UnixNano())
		c := newCache(t, b, &cacheaside.Options[string]{Clock: clk.Now, LeaseTTL: 5 * time.Second,
			Policy: cacheaside.Policy{TTL: time.Minute, StaleWhileRevalidate: time.Hour, NoJitter: true, NoEarlyRefresh: true}})
		key := b.ks.Key("hot")
		if _, err := c.Get(ctx, key, func(context.Context) (string, error) { return "old", nil }); err != nil {
			t.Fatal(err)
		}
		clk.Advance(2 * time.Minute) // the value went stale a minute ago, by the cache's clock
		started, release := make(chan struct{}), make(chan struct{})
		var once sync.Once
		defer once.Do(func() { close(release) })
		v, err := c.Get(ctx, key, func(context.Context) (string, error) {
			close(started)
			<-release
			return "new", nil
		})
		if v != "old" || err != nil {
			t.Fatalf("stale Get: %q, %v; want the stale value", v, err)
		}
		<-started
		in := b.inspectJSON(t, key)
		if in.Kind != "refreshing" || string(in.Value) != `"old"` {
			t.Errorf("%s %s, want refreshing \"old\"", in.Kind, in.Value)
		}
		if d := in.RefreshDeadline; d == nil || d.InMs <= 0 || d.InMs > 5000 {
			t.Errorf("refresh deadline %+v, want within the 5s LeaseTTL", d)
		}
		if s := in.SoftExpiry; s == nil || s.InMs > -50_000 || s.InMs < -70_000 {
			t.Errorf("soft expiry %+v, want about a minute ago (negative)", s)
		}
		mustContain(t, b.ok(t, "inspect", key), "kind           refreshing\n", "refresh lease  ", "; Redis clock)\n", " left, past)\n")
		once.Do(func() { close(release) })
		waitFor(t, "the refreshed value", func() bool {
			in := b.inspectJSON(t, key)
			return in.Kind == "value" && string(in.Value) == `"new"`
		})
	})
}
