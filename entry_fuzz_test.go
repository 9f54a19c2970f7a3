package cacheaside

import (
	"context"
	"math"
	"runtime"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// fuzzItem is a struct of the shapes a decoder sizes from its input.
type fuzzItem struct {
	A []int64
	M map[string]any
	T map[string]time.Time
	S []struct{ N string }
}

// entryReader reads one entry's bytes as a Get does (Cache.classify), for
// one value type and codec.
type entryReader struct {
	name string
	read func(b []byte)
}

func readerFor[T any](f *testing.F, rdb *redis.Client, name string, codec Codec[T]) entryReader {
	c, err := New[T](rdb, &Options[T]{Name: name, Codec: codec, NoReadCoalescing: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = c.Close() })
	ctx := context.Background()
	return entryReader{name, func(b []byte) { c.classify(ctx, "k", b, genView{}, time.Now()) }}
}

// FuzzEntry: bytes under a key are input. Whatever they hold, reading them
// as an entry (header, then the codec's payload) must not panic, and must
// not allocate more than a bound proportional to their size, for every
// codec and for types that hold interfaces, maps, numeric slices and
// slices of structs. CI runs it under a 4 GB address-space limit, so an
// allocation sized from a hostile header fails it even where the bound
// check would come too late.
func FuzzEntry(f *testing.F) {
	mr := miniredis.RunT(f)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	f.Cleanup(func() { _ = rdb.Close() })
	readers := []entryReader{
		readerFor(f, rdb, "json-any", JSON[any]()),
		readerFor(f, rdb, "json-map", JSON[map[string]any]()),
		readerFor(f, rdb, "json-int64s", JSON[[]int64]()),
		readerFor(f, rdb, "json-items", JSON[[]fuzzItem]()),
		readerFor(f, rdb, "msgpack-any", Msgpack[any]()),
		readerFor(f, rdb, "msgpack-map", Msgpack[map[string]any]()),
		readerFor(f, rdb, "msgpack-int64s", Msgpack[[]int64]()),
		readerFor(f, rdb, "msgpack-items", Msgpack[[]fuzzItem]()),
	}
	soft := time.Now().Add(time.Hour).UnixMilli()
	entry := func(format byte, payload []byte) []byte {
		return envelope.Encode(&envelope.Entry{Kind: envelope.Value, Format: format, Token: envelope.Token{1}, SoftExpiry: soft, Payload: payload})
	}
	item := []fuzzItem{{A: []int64{1, 2}, M: map[string]any{"a": 1.5}, T: map[string]time.Time{"t": time.Unix(1, 0)}, S: []struct{ N string }{{"x"}}}}
	if b, err := JSON[[]fuzzItem]().Marshal(item); err == nil {
		f.Add(entry(formatJSON, b))
	}
	if b, err := Msgpack[[]fuzzItem]().Marshal(item); err == nil {
		f.Add(entry(formatMsgpack, b))
	}
	f.Add(entry(formatJSON, []byte(`[[[[[[[[1]]]]]]]]`)))
	f.Add(entry(formatMsgpack, []byte{0xdd, 0xff, 0xff, 0xff, 0xff}))
	f.Add(entry(formatMsgpack, []byte{0xc7, 0x0a, 0x05, 0xde, 0x00, 0x01, 0xa1, 'k', 0xdd, 0x7f, 0xff, 0xff, 0xff}))
	f.Add(envelope.Encode(&envelope.Entry{Kind: envelope.NotFound, Format: formatJSON, Token: envelope.Token{2}}))
	f.Fuzz(func(t *testing.T, data []byte) {
		// 256 bytes per input byte: a JSON "[" or "{" costs a slice or map
		// header and its first growth; anything past that is a bug.
		limit := uint64(256*len(data) + 64<<10)
		for _, r := range readers {
			// TotalAlloc counts every goroutine of the process (miniredis,
			// the caches' listeners): the least of three reads is this one's.
			got := uint64(math.MaxUint64)
			for range 3 {
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				r.read(data)
				runtime.ReadMemStats(&after)
				got = min(got, after.TotalAlloc-before.TotalAlloc)
				if got <= limit {
					break
				}
			}
			// The race detector's own allocations would count too.
			if got > limit && !raceEnabled {
				t.Fatalf("reading a %d-byte entry as %s allocated %d bytes, over %d", len(data), r.name, got, limit)
			}
		}
	})
}
