package envelope

import (
	"bytes"
	"errors"
	"testing"
)

func sample() *Entry {
	return &Entry{Kind: Value, Format: 1, Token: Token{1, 2, 3}, SoftExpiry: 1700000000000, LoadMillis: 42, Gen: Gen{7, 0, 9}, Written: 1699999700000, Payload: []byte(`{"id":1}`)}
}

func TestRoundTrip(t *testing.T) {
	for _, in := range []*Entry{
		sample(),
		{Kind: NotFound, Format: 2, Token: Token{9}},
		{Kind: Lease, Format: 1, Token: Token{15: 1}},
		{Kind: Refreshing, Format: 1, Token: Token{3}, Payload: []byte("x")},
		{Kind: Value, Format: 1, Token: Token{7}}, // empty payload
	} {
		b := Encode(in)
		var out Entry
		if err := Decode(b, &out); err != nil {
			t.Fatalf("Decode(Encode(%+v)) = %v", in, err)
		}
		if out.Kind != in.Kind || out.Format != in.Format || out.Token != in.Token || out.SoftExpiry != in.SoftExpiry ||
			out.LoadMillis != in.LoadMillis || out.Gen != in.Gen || !bytes.Equal(out.Payload, in.Payload) {
			t.Fatalf("round trip: got %+v, want %+v", out, *in)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	good := Encode(sample())
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrNoEnvelope},
		{"magic", mut(func(b []byte) []byte { b[0] = 'x'; return b }), ErrMagic},
		{"magic only", []byte{Magic}, ErrShort},
		{"version", mut(func(b []byte) []byte { b[1] = 1; return b }), ErrVersion}, // version 1: a 40-byte header
		{"short", good[:HeaderSize-1], ErrShort},
		{"kind", mut(func(b []byte) []byte { b[2] = 0; return b }), ErrKind},
		{"payload on lease", append(Encode(&Entry{Kind: Lease, Token: Token{1}}), 'x'), ErrTrailing},
		{"zero token", Encode(&Entry{Kind: Value}), ErrZeroToken},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var e Entry
			if err := Decode(tc.b, &e); !errors.Is(err, tc.want) {
				t.Fatalf("Decode = %v, want %v", err, tc.want)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(Encode(sample()))
	f.Add(Encode(&Entry{Kind: Lease, Token: Token{1}}))
	f.Add([]byte("not an entry"))
	f.Add([]byte{Magic, Version})
	f.Fuzz(func(t *testing.T, b []byte) {
		var e Entry
		if err := Decode(b, &e); err != nil {
			return
		}
		// Whatever decodes must re-encode to the same bytes.
		if again := Encode(&e); !bytes.Equal(again, b) {
			t.Fatalf("Encode(Decode(%x)) = %x", b, again)
		}
	})
}
