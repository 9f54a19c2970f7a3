package bounded

import (
	"bytes"
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// hostile are values whose headers declare more than they hold: the
// first is an entry's payload that made msgpack ask for 64 GiB.
var hostile = [][]byte{
	{0xdd, 0xff, 0xff, 0xff, 0xff},       // array32 of 2^32-1 elements, no elements
	{0xdf, 0xff, 0xff, 0xff, 0xff},       // map32
	{0x91, 0xdd, 0x7f, 0xff, 0xff, 0xff}, // nested
	{0xdb, 0xff, 0xff, 0xff, 0xff, 'a'},  // str32
	{0xc6, 0x7f, 0xff, 0xff, 0xff},       // bin32
	{0xc9, 0x7f, 0xff, 0xff, 0xff, 0x01}, // ext32
	{0xdc, 0x00, 0x03, 0x01, 0x02},       // array16 of 3 with 2
	{0x82, 0x01},                         // fixmap of 2 with half an entry
	{0xc1},                               // never used
	{0xcb, 0x00},                         // truncated float64
	append([]byte{0xdd, 0x00, 0x01, 0x00, 0x00}, bytes.Repeat([]byte{0xc0}, 65535)...), // 65536 declared, 65535 there
}

// extWrapped are values where msgpack, expecting a Go map, skips an
// extension header and reads a map from its payload: ext8 wrapping
// {"k": array32 of 2^31-1} asks for 32 GiB for a map[string]any.
var extWrapped = [][]byte{
	{0xc7, 0x0a, 0x05, 0xde, 0x00, 0x01, 0xa1, 'k', 0xdd, 0x7f, 0xff, 0xff, 0xff},
	{0xd4, 0x30, 0xde, 0x30, 0x30},
	// ext8 with an empty payload, followed by the map msgpack then reads.
	{0xc7, 0x00, 0xff, 0xde, 0x00, 0x01, 0xa1, 0x05, 0xdd, 0x7f, 0xff, 0xff, 0xf7},
}

func TestMsgpackForMapsRefusesExtWrappedMaps(t *testing.T) {
	for _, b := range extWrapped {
		if err := MsgpackForMaps(b); err == nil {
			t.Errorf("% x: accepted for a type that holds maps", b)
		}
	}
	// A time.Time (extension -1) with a payload that does not begin with
	// a map header is accepted either way.
	tm, _ := msgpack.Marshal(map[string]time.Time{"t": time.Unix(1700000000, 5)})
	if err := MsgpackForMaps(tm); err != nil {
		t.Errorf("a map of times: %v", err)
	}
}

func TestMsgpackRefusesHostileHeaders(t *testing.T) {
	for _, b := range hostile {
		if err := Msgpack(b); err == nil {
			t.Errorf("% x: accepted", b[:min(len(b), 8)])
		}
	}
	var v any
	if err := Msgpack(hostile[0]); !errors.Is(err, ErrTooLong) {
		t.Errorf("array32 header: %v, want ErrTooLong", err)
	} else if err := msgpack.Unmarshal([]byte{0x92, 0x01, 0x02}, &v); err != nil {
		t.Fatal(err)
	}
}

func TestMsgpackAcceptsWhatMsgpackWrites(t *testing.T) {
	type item struct {
		ID   int64
		Tags []string
		Meta map[string]any
		Raw  []byte
		F    float64
		Opt  *int
	}
	for _, v := range []any{
		nil, true, 1, -1, int64(-1 << 40), uint64(1 << 63), 3.5, float32(1.5), "", "héllo",
		make([]any, 20), []int64{1, -2, 1 << 40}, map[string]any{"a": []any{1, "b", nil}},
		[]item{{ID: 1, Tags: []string{"x"}, Meta: map[string]any{"k": 1.5}, Raw: make([]byte, 300)}},
		bytes.Repeat([]byte("z"), 70000), string(bytes.Repeat([]byte("s"), 70000)), make([]any, 70000),
	} {
		b, err := msgpack.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := Msgpack(b); err != nil {
			t.Errorf("%T: %v", v, err)
		}
	}
}

// FuzzMsgpack: whatever the bytes, a value the check accepts decodes (or
// fails) into any, []int64, map[string]any or a slice of structs while
// allocating at most a constant times the input's size.
func FuzzMsgpack(f *testing.F) {
	for _, b := range hostile {
		f.Add(b)
	}
	for _, b := range extWrapped {
		f.Add(b)
	}
	for _, v := range []any{[]any{1, "a", []int64{1, 2}}, map[string]any{"a": 1}, []int64{5, 6}} {
		b, _ := msgpack.Marshal(v)
		f.Add(b)
	}
	type item struct {
		A []int64
		M map[string]any
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if Msgpack(data) != nil {
			return
		}
		// 64 bytes per input byte: an interface value is 16 bytes and a
		// map entry a few times that; anything past that is a bug.
		limit := uint64(64*len(data) + 64<<10)
		decode := func(name string, v any) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_ = msgpack.Unmarshal(data, v)
			runtime.ReadMemStats(&after)
			if got := after.TotalAlloc - before.TotalAlloc; got > limit {
				t.Fatalf("decoding % x into %s allocated %d bytes, over %d", data[:min(len(data), 16)], name, got, limit)
			}
		}
		var a any
		decode("any", &a)
		var s []int64
		decode("[]int64", &s)
		if MsgpackForMaps(data) == nil { // what a codec whose type holds a map checks
			var m map[string]any
			decode("map[string]any", &m)
			var mi map[int64][]int64
			decode("map[int64][]int64", &mi)
		}
		var items []item
		decode("[]item", &items)
	})
}
