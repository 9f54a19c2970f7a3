package cacheaside

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// TestHostileMsgpackEntry: a 45-byte entry whose msgpack payload declares
// an array of 2^32-1 elements made the decoder ask for 64 GiB, and the
// runtime's out-of-memory is fatal: every process that read the key died.
// It must read as a corrupt entry (a miss, reloaded and overwritten), for
// every type msgpack sizes from the header.
func TestHostileMsgpackEntry(t *testing.T) {
	payloads := map[string][]byte{
		"array32": {0xdd, 0xff, 0xff, 0xff, 0xff},
		"map32":   {0xdf, 0xff, 0xff, 0xff, 0xff},
		"nested":  {0x91, 0xdd, 0xff, 0xff, 0xff, 0xff},
		// Where msgpack expects a Go map it skips an extension header and
		// reads a map from the payload: {"k": array32 of 2^31-1}.
		"ext-wrapped": {0xc7, 0x0a, 0x05, 0xde, 0x00, 0x01, 0xa1, 'k', 0xdd, 0x7f, 0xff, 0xff, 0xff},
	}
	forEachBackend(t, func(t *testing.T, b *backend) {
		for name, p := range payloads {
			raw := envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: formatMsgpack, Token: newToken(),
				SoftExpiry: time.Now().Add(time.Hour).UnixMilli(), Payload: p})
			t.Run(name, func(t *testing.T) {
				hostileGet(t, b, name+":any", raw, func(c context.Context, key string) error {
					cache := newCache(t, b, &Options[[]any]{Name: "hostile-any", Codec: Msgpack[[]any]()})
					v, err := cache.Get(c, key, func(context.Context) ([]any, error) { return []any{"ok"}, nil })
					if err == nil && (len(v) != 1 || v[0] != "ok") {
						err = errors.New("not the loader's value")
					}
					return checkCorrupt(cache.Stats(), err)
				})
				hostileGet(t, b, name+":int64s", raw, func(c context.Context, key string) error {
					cache := newCache(t, b, &Options[[]int64]{Name: "hostile-int64s", Codec: Msgpack[[]int64]()})
					_, err := cache.Get(c, key, func(context.Context) ([]int64, error) { return []int64{1}, nil })
					return checkCorrupt(cache.Stats(), err)
				})
				hostileGet(t, b, name+":map", raw, func(c context.Context, key string) error {
					cache := newCache(t, b, &Options[map[string]any]{Name: "hostile-map", Codec: Msgpack[map[string]any]()})
					_, err := cache.Get(c, key, func(context.Context) (map[string]any, error) { return map[string]any{}, nil })
					return checkCorrupt(cache.Stats(), err)
				})
			})
		}
	})
}

func hostileGet(t *testing.T, b *backend, key string, raw []byte, get func(context.Context, string) error) {
	t.Helper()
	key = b.key(key)
	if err := b.client(t).Set(context.Background(), key, raw, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if err := get(context.Background(), key); err != nil {
		t.Fatalf("%s: %v", key, err)
	}
}

func checkCorrupt(st Stats, err error) error {
	if err != nil {
		return err
	}
	if st.DecodeErrors != 1 || st.Loads != 1 {
		return fmt.Errorf("%d decode errors and %d loads, want 1 and 1", st.DecodeErrors, st.Loads)
	}
	return nil
}

// TestTombstoneWithoutTTL: a "not found" whose Redis TTL was lost
// (PERSIST, a restore without TTLs) is reloaded once past its negative TTL,
// as a value past every window is, instead of answering "not found"
// forever. Before its negative TTL ends it is still served.
func TestTombstoneWithoutTTL(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		clock := newFakeClock()
		c := newCache(t, b, &Options[string]{Clock: clock.Now, Policy: Policy{TTL: time.Hour, NegativeTTL: time.Minute, NoJitter: true}})
		key := b.key("gone")
		var n counter
		if _, err := c.Get(ctx, key, func(context.Context) (string, error) { n.calls.Add(1); return "", ErrNotFound }); !errors.Is(err, ErrNotFound) {
			t.Fatalf("first Get: %v", err)
		}
		rdb := b.client(t)
		if ok, err := rdb.Persist(ctx, key).Result(); err != nil || !ok {
			t.Fatalf("PERSIST: %v %v", ok, err)
		}
		clock.Advance(59 * time.Second)
		if _, err := c.Get(ctx, key, n.load("created", 0)); !errors.Is(err, ErrNotFound) || n.calls.Load() != 1 {
			t.Fatalf("inside the negative TTL: %v after %d loads, want ErrNotFound and 1", err, n.calls.Load())
		}
		clock.Advance(2 * time.Second)
		v, err := c.Get(ctx, key, n.load("created", 0))
		if err != nil || v != "created" || n.calls.Load() != 2 {
			t.Fatalf("past the negative TTL: %q, %v after %d loads; want the loader's value", v, err, n.calls.Load())
		}
		if ttl := rdb.PTTL(ctx, key).Val(); ttl <= 0 {
			t.Fatalf("the reloaded entry has PTTL %v, want a lifetime", ttl)
		}
	})
}

// panicCodec is a codec whose Marshal panics.
type panicCodec struct{}

func (panicCodec) Format() byte                    { return 201 }
func (panicCodec) Marshal(string) ([]byte, error)  { panic("codec boom") }
func (panicCodec) Unmarshal([]byte, *string) error { return nil }

// TestCodecPanicNamed: a panic in a codec during a load reaches the caller
// as a *PanicError that says a codec (not the loader) panicked; the lease
// is released and the next Get loads again.
func TestCodecPanicNamed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[string]{Codec: panicCodec{}})
		var n counter
		for i := range 2 {
			_, err := c.Get(context.Background(), b.key("p"), n.load("v", 0))
			var pe *PanicError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), "panic in a codec") || strings.Contains(err.Error(), "loader panicked") {
				t.Fatalf("Get #%d: %v, want a *PanicError naming the codec", i, err)
			}
		}
		if n.calls.Load() != 2 {
			t.Fatalf("%d loads, want 2: the lease must be released after the panic", n.calls.Load())
		}
	})
}

// TestMsgpackMapOfTimes: the check for types that hold maps still accepts
// what msgpack writes for them, times (an extension) included, so such
// entries are hits.
func TestMsgpackMapOfTimes(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := newCache(t, b, &Options[map[string]time.Time]{Codec: Msgpack[map[string]time.Time]()})
		var n counter
		want := map[string]time.Time{}
		for i := range 50 {
			want[fmt.Sprint(i)] = time.Unix(1700000000+int64(i), int64(i)*19_999_999).UTC()
		}
		load := func(context.Context) (map[string]time.Time, error) { n.calls.Add(1); return want, nil }
		for range 3 {
			got, err := c.Get(context.Background(), b.key("times"), load)
			if err != nil || len(got) != len(want) || !got["7"].Equal(want["7"]) {
				t.Fatalf("Get = %v, %v", got, err)
			}
		}
		if st := c.Stats(); n.calls.Load() != 1 || st.DecodeErrors != 0 {
			t.Fatalf("%d loads, %d decode errors; want 1 and 0", n.calls.Load(), st.DecodeErrors)
		}
	})
}

func TestHoldsMap(t *testing.T) {
	type inner struct{ M map[int][]any }
	type rec struct {
		Next *rec
		Tags map[string]string
	}
	for _, tc := range []struct {
		v    any
		want bool
	}{
		{map[string]any{}, true},
		{[]inner{}, true},
		{struct{ P *inner }{}, true},
		{map[string]time.Time{}, false},
		{map[string]string{}, false},
		{[]any{}, false},
		{struct{ A any }{}, false},
		{rec{}, false},
		{map[string]map[int]string{}, false},
	} {
		v, want := tc.v, tc.want
		if got := holdsMap(reflect.TypeOf(v)); got != want {
			t.Errorf("holdsMap(%T) = %v, want %v", v, got, want)
		}
	}
}
