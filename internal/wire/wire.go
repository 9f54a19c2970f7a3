// Package wire holds what the cacheaside library and the tools that read
// its data in Redis (the cacheaside command) must agree on: how key parts
// are escaped, where a namespace's generation lives, the channels it
// publishes on, the codecs' format bytes, and the defaults the command
// mirrors. It is internal: users build keys with Keyspace and Namespace.
package wire

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Channels: + Options.Name.
const (
	WakeChannelPrefix = "cacheaside:filled:"     // fills of contended leases wake their waiters here
	BusChannelPrefix  = "cacheaside:invalidate:" // the local tiers' invalidation bus (LocalOptions.Channel's default)
)

// ShardTag goes before every channel name on a Redis Cluster that has
// sharded pub/sub (SSUBSCRIBE and SPUBLISH, Redis 7): it puts all of the
// library's channels in one slot, so a process subscribes to all of them
// on one connection to one shard, and a message goes to that shard only
// rather than to every node.
const ShardTag = "{cacheaside}"

// ShardProbe is the channel of the SPUBLISH that asks a Cluster whether it
// has sharded pub/sub. Nobody subscribes to it.
const ShardProbe = ShardTag + "probe"

// The format bytes of the built-in codecs (Codec.Format).
const (
	FormatJSON    byte = 1
	FormatMsgpack byte = 2
)

// Defaults of Options the command mirrors.
const (
	DefaultName         = "default"
	DefaultTTL          = 5 * time.Minute
	DefaultMaxValueSize = 1 << 20
)

// EscapePart percent-encodes the bytes of s that carry meaning in a key or
// in a SCAN pattern: '%', ':', the glob characters * ? [ ] \, the hash-tag
// braces { }, '#' (which marks the library's own namespace keys), space and
// ASCII control characters. Everything else, including
// UTF-8, is kept. The encoding is injective, so distinct parts always give
// distinct keys. A part that needs no escaping is returned as is.
func EscapePart(s string) string {
	if EscapedExtra(s) == 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 2*EscapedExtra(s))
	WriteEscaped(&b, s)
	return b.String()
}

// UnescapePart reverses EscapePart.
func UnescapePart(s string) (string, error) {
	if strings.IndexByte(s, '%') < 0 {
		return s, nil
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("truncated escape in %q", s)
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", fmt.Errorf("bad escape %q in %q", s[i:i+3], s)
		}
		b.WriteByte(hi<<4 | lo)
		i += 2
	}
	return b.String(), nil
}

// GenerationKey returns the generation key of the namespace key belongs
// to, and false for a key outside any namespace. A namespaced
// key contains a hash tag "{...}" followed by the end of the key or a
// separator, as Namespace.Key builds them; the generation key is
// everything up to the tag, then ":#gen". Tools that read entries (the
// cacheaside command) use it to find the generation a Get compares with.
// GenerationSuffix ends every namespace generation key.
const GenerationSuffix = ":#gen"

// Prefixes of the generation keys of tags and of a cache's Clear: a tag's
// is TagKeyPrefix + EscapePart(Name) + ":" + EscapePart(tag), Clear's
// ClearKeyPrefix + EscapePart(Name). Each holds 8 random bytes.
const (
	TagKeyPrefix   = "cacheaside:tag:"
	ClearKeyPrefix = "cacheaside:clear:"
)

func GenerationKey(key string) (string, bool) {
	open := strings.IndexByte(key, '{')
	if open < 0 {
		return "", false
	}
	end := strings.IndexByte(key[open:], '}')
	if end <= 1 {
		return "", false
	}
	end += open
	if end+1 < len(key) && key[end+1] != ':' {
		return "", false
	}
	return key[:end+1] + GenerationSuffix, true
}

// EscapeGlob escapes the Redis glob characters * ? [ ] \ in s with a
// backslash, so s matches itself literally in SCAN MATCH or KEYS. To match
// every key that starts with prefix, use EscapeGlob(prefix) + "*".
func EscapeGlob(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if isGlob(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + n)
	for i := 0; i < len(s); i++ {
		if isGlob(s[i]) {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isGlob(c byte) bool {
	return c == '*' || c == '?' || c == '[' || c == ']' || c == '\\'
}

func needsEscape(c byte) bool {
	return c <= ' ' || c == 0x7f || c == '%' || c == ':' || c == '{' || c == '}' || c == '#' || isGlob(c)
}

// EscapedExtra counts the bytes of s that EscapePart encodes.
func EscapedExtra(s string) int {
	n := 0
	for i := 0; i < len(s); i++ {
		if needsEscape(s[i]) {
			n++
		}
	}
	return n
}

const hexDigits = "0123456789ABCDEF"

func WriteEscaped(b *strings.Builder, s string) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if needsEscape(c) {
			b.WriteByte('%')
			b.WriteByte(hexDigits[c>>4])
			b.WriteByte(hexDigits[c&15])
			continue
		}
		b.WriteByte(c)
	}
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// SplitNamespace reads a namespace's string form, as Namespace.String
// prints it ("v1:task_lists:{org:acme}"), or its generation key, into the
// keyspace's name and version and the namespace's unescaped parts. The
// caller rebuilds the Namespace with Keyspace.Namespace and checks that it
// spells s back: that, not this, proves s a namespace.
func SplitNamespace(s string) (name string, version int, parts []string, err error) {
	bad := func(why string) (string, int, []string, error) {
		return "", 0, nil, fmt.Errorf("%q is not a namespace: %s; a namespace looks like v1:task_lists:{org:acme}", s, why)
	}
	tag := strings.TrimSuffix(s, GenerationSuffix)
	ver, rest, ok := strings.Cut(tag, ":")
	if !ok || len(ver) < 2 || ver[0] != 'v' {
		return bad("it does not start with v<version>:")
	}
	version, err = strconv.Atoi(ver[1:])
	if err != nil {
		return bad("bad version " + strconv.Quote(ver))
	}
	name, inner, _ := strings.Cut(rest, ":")
	if len(inner) < 3 || inner[0] != '{' || inner[len(inner)-1] != '}' {
		return bad("no {...} after the keyspace name")
	}
	parts = strings.Split(inner[1:len(inner)-1], ":")
	for i, p := range parts {
		if parts[i], err = UnescapePart(p); err != nil {
			return bad(err.Error())
		}
	}
	return name, version, parts, nil
}
