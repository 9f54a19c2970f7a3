package cacheaside

import (
	"fmt"
	goscanner "go/scanner"
	"go/token"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// The documents state defaults, sizes, channel names and commands that the
// code defines. TestDocsFacts finds every statement of each fact in
// docFacts and compares it with the value the code uses, so a change to
// either side alone fails with the file, the line and both values.
//
// The documents are the Markdown files and, in the Go files, the comments
// and string literals (doc comments, the CLI's usage text, the demo's
// output). Wrapped lines are joined into paragraphs and backticks dropped
// before the regexps run, so a statement may wrap anywhere. In a regexp,
// DUR stands for a duration ("50ms", "1 s"; a bare number is milliseconds,
// as in Redis commands), NUM for a number ("10,000", "four") and SIZE for
// a size ("1 MiB", "1024 bytes"). Group 1 is the stated value.

// docFact is one fact and the statements of it.
type docFact struct {
	what string   // the fact
	from string   // where the code defines it
	want any      // time.Duration, int, float64, string, or oneOf
	res  []string // regexps that find statements of it
}

// oneOf: the stated value must be one of these.
type oneOf []string

func docFacts(t *testing.T) []docFact {
	o, err := (*Options[struct{}])(nil).resolve()
	if err != nil {
		t.Fatal(err)
	}
	d := o.Degradation
	lo, err := (&LocalOptions{}).resolve(o.Name)
	if err != nil {
		t.Fatal(err)
	}
	polls := []string{}
	for p := o.PollMin; p < o.PollMax; p *= 2 {
		polls = append(polls, strconv.FormatInt(p.Milliseconds(), 10))
	}
	pollSeq := strings.Join(polls, ", ") + " and then every " + fmt.Sprint(o.PollMax.Milliseconds()) + " ms"

	return []docFact{
		// Degradation (options.go)
		{"Degradation.OpTimeout default", "defaultOpTimeout, options.go", defaultOpTimeout, []string{
			`OpTimeout \(default (DUR)\)`, `OpTimeout \| (DUR) \|`, `OpTimeout, (DUR) by default`,
			`^OpTimeout bounds .*?Default (DUR)`, `per-command budget \((DUR)\)`, `the (DUR) (?:read )?budget`}},
		{"Degradation.WriteTimeout default", "Degradation.resolve, options.go", d.WriteTimeout, []string{
			`WriteTimeout \((?:default NUM × OpTimeout, )?(DUR)`, `WriteTimeout \| NUM × OpTimeout \((DUR)\)`,
			`^WriteTimeout bounds .*?Default NUM × OpTimeout \((DUR)\)`}},
		{"Degradation.WriteTimeout in OpTimeouts", "Degradation.resolve, options.go", int(d.WriteTimeout / d.OpTimeout), []string{
			`WriteTimeout (?:\(default |\| |bounds .*?Default )(NUM) × OpTimeout`}},
		{"Degradation.RedisTimePerGet default", "Degradation.resolve, options.go", d.RedisTimePerGet, []string{
			`RedisTimePerGet \(default NUM × OpTimeout, (DUR)\)`, `RedisTimePerGet \| NUM × OpTimeout \((DUR)\)`,
			`Default NUM × OpTimeout \((DUR)\); at least OpTimeout\.`}},
		{"Degradation.RedisTimePerGet in OpTimeouts", "Degradation.resolve, options.go", int(d.RedisTimePerGet / d.OpTimeout), []string{
			`RedisTimePerGet (?:\(default |\| )(NUM) × OpTimeout`, `Default (NUM) × OpTimeout \(DUR\); at least OpTimeout\.`}},
		{"Degradation.BreakerFailures default", "defaultBreakerFailures, options.go", defaultBreakerFailures, []string{
			`BreakerFailures \((NUM)\)`, `BreakerFailures / BreakerCooldown \| (NUM) /`, `^BreakerFailures is .*?Default (NUM)\.`}},
		{"Degradation.BreakerCooldown default", "defaultBreakerCooldown, options.go", defaultBreakerCooldown, []string{
			`BreakerCooldown \((DUR)\)`, `BreakerFailures / BreakerCooldown \| NUM / (DUR)`, `^BreakerCooldown is .*?Default (DUR)\.`}},
		{"Degradation.MaxLoadsWhileDown default", "defaultMaxLoadsWhileDown, options.go", defaultMaxLoadsWhileDown, []string{
			`MaxLoadsWhileDown \((NUM)\)`, `MaxLoadsWhileDown \| (NUM) \|`, `^MaxLoadsWhileDown caps .*?Default (NUM)\.`}},

		// Options (options.go)
		{"Options.LoadTimeout default", "defaultLoadTimeout, options.go", defaultLoadTimeout, []string{
			`LoadTimeout \((DUR)\)`, `LoadTimeout \| (DUR) \|`, `^LoadTimeout bounds .*?Default (DUR)\.`}},
		{"Options.LeaseTTL default", "defaultLeaseTTL, options.go", defaultLeaseTTL, []string{
			`(?:^|[^+] )LeaseTTL \((DUR)\)`, `LeaseTTL \| (DUR) \|`, `^LeaseTTL is .*?Default (DUR);`,
			`<lease> (?:PX )?(\d+)\b`, `PEXPIRE \S+ (\d+)\b`}},
		{"lease renewal interval (LeaseTTL/3)", "keepLeases, lock.go", defaultLeaseTTL / 3, []string{
			`PEXPIRE \S+ \d+ every (second|DUR)`}},
		{"LoadTimeout + LeaseTTL", "defaultLoadTimeout + defaultLeaseTTL, options.go", defaultLoadTimeout + defaultLeaseTTL, []string{
			`LoadTimeout \+ LeaseTTL \((DUR)\)`}},
		{"Options.PollMin default", "defaultPollMin, options.go", defaultPollMin, []string{
			`PollMin / PollMax \| (DUR) /`, `Defaults (DUR) and DUR\.`}},
		{"Options.PollMax default", "defaultPollMax, options.go", defaultPollMax, []string{
			`PollMin / PollMax \| DUR / (DUR)`, `Defaults DUR and (DUR)\.`}},
		{"polls without the wake channel", "defaultPollMin, defaultPollMax, options.go", pollSeq, []string{
			`polls after about ([\d, ]+ and then every DUR)`}},
		{"Options.MaxValueSize default", "defaultMaxValueSize, options.go", defaultMaxValueSize, []string{
			`MaxValueSize \((SIZE)\)`, `MaxValueSize / MaxKeySize \| (SIZE) /`, `^MaxValueSize is .*?Default (SIZE)\.`}},
		{"Options.MaxKeySize default", "defaultMaxKeySize, options.go", defaultMaxKeySize, []string{
			`MaxKeySize \((SIZE)\)`, `MaxValueSize / MaxKeySize \| SIZE / (SIZE) \|`, `^MaxKeySize is .*?Default (SIZE)\.`}},
		{"Options.Name default", "defaultName, options.go", defaultName, []string{
			`^Name labels .*?Default "(\w+)"`, `default "(\w+)", the library's default name`}},

		// Policy (ttl.go)
		{"Policy.TTL default", "defaultTTL, ttl.go", defaultTTL, []string{
			`Policy\.TTL / NegativeTTL / Jitter \| (DUR) /`, `\(TTL (DUR), negative`,
			`^TTL is how long a value stays in Redis.*?Default (DUR)`, `--ttl .*?\(default (DUR)\)`}},
		{"Policy.NegativeTTL default", "defaultNegativeTTL, ttl.go", defaultNegativeTTL, []string{
			`Policy\.TTL / NegativeTTL / Jitter \| DUR / (DUR) /`, `negative (DUR), jitter`,
			`^NegativeTTL is how long.*?Default (DUR)`}},
		{"Policy.Jitter default", "defaultJitter, ttl.go", defaultJitter, []string{
			`Policy\.TTL / NegativeTTL / Jitter \| DUR / DUR / ([\d.]+) \|`, `^Jitter is the fraction.*?Default ([\d.]+)`}},
		{"Policy.Jitter default, in percent", "defaultJitter, ttl.go", int(math.Round(defaultJitter * 100)), []string{
			`jitter (\d+)%`, `up to (\d+)% at random`, `Jitter \((\d+)%\)`, `Default [\d.]+ \((\d+)%\)`}},
		{"Policy.Beta default", "defaultBeta, ttl.go", defaultBeta, []string{
			`Policy\.Beta \| ([\d.]+) \|`, `XFetch beta ([\d.]+)`, `Beta defaults to ([\d.]+)`,
			`Beta ([\d.]+) \(default\)`, `^Beta scales .*?Default ([\d.]+)`}},

		// The local tier (local.go) and the wake channel (wait.go)
		{"LocalOptions.TTL default", "defaultLocalTTL, local.go", lo.TTL, []string{
			`LocalOptions\.TTL \((?:default )?(DUR)\)`, `MaxEntries NUM, TTL (DUR)`, `for the default (DUR)\)`,
			`^TTL is the longest a value is served from memory.*?Default (DUR)`}},
		{"LocalOptions.HealthCheck default", "defaultLocalHealthCheck, local.go", lo.HealthCheck, []string{
			`HealthCheck \(?(?:default )?(DUR)`, `^HealthCheck is how long .*?Default (DUR)`}},
		{"LocalOptions.MaxEntries default", "defaultLocalMaxEntries, local.go", lo.MaxEntries, []string{
			`MaxEntries (NUM)`, `^MaxEntries bounds .*?Default (NUM)`}},
		{"local clock tick at the default TTL", "coarseResolution, local.go", coarseResolution(lo.TTL), []string{
			`(DUR) for the default DUR\)`}},
		{"local clock tick, shortest", "coarseResolution, local.go", coarseResolution(0), []string{
			`TTL/100, between (DUR) and`, `TTL/100 \(at least (DUR),`}},
		{"local clock tick, longest", "coarseResolution, local.go", coarseResolution(time.Hour), []string{
			`TTL/100, between DUR and (DUR)`, `TTL/100 \(at least DUR, at most (DUR)\)`}},
		{"local epoch stripes", "localStripes, local.go", localStripes, []string{`one of (NUM) stripes`}},
		{"channel and key prefixes", "defaultLocalChannelPrefix, local.go; wakeChannelPrefix, wait.go; tagKeyPrefix, clearKeyPrefix, tags.go",
			oneOf{defaultLocalChannelPrefix, wakeChannelPrefix, tagKeyPrefix, clearKeyPrefix}, []string{`(cacheaside:[\w.-]+:)`}},
		{"invalidation bus channel", "defaultLocalChannelPrefix, local.go", defaultLocalChannelPrefix, []string{
			`(cacheaside:[\w.-]+:)<Name> unless LocalOptions\.Channel`, `Channel (cacheaside:[\w.-]+:)<Name>`,
			`bus channel is "(cacheaside:[\w.-]+:)"`, `--cache \(the channel is (cacheaside:[\w.-]+:)`,
			`publish(?:es|ed)? on (cacheaside:[\w.-]+:)`, `publish (cacheaside:[\w.-]+:)`, `Default "(cacheaside:[\w.-]+:)" \+ Options\.Name`}},
		{"wake channel", "wakeChannelPrefix, wait.go", wakeChannelPrefix, []string{
			`wake channel \((cacheaside:[\w.-]+:)`, `Waiters are woken .*?\(the channel is (cacheaside:[\w.-]+:)`}},

		// Entries (internal/envelope), invalidation (invalidate.go), the rest
		{"entry header size", "envelope.HeaderSize, internal/envelope", envelope.HeaderSize, []string{
			`(\d+)-byte (?:entry )?header`, `\((\d+) header, \d+ payload\)`, `first (\d+) bytes of each key`}},
		{"lease token bits", "envelope.TokenSize, internal/envelope", envelope.TokenSize * 8, []string{
			`(\d+)-bit (?:random )?(?:lease )?token`}},
		{"namespace generation bits", "envelope.GenSize, internal/envelope", envelope.GenSize * 8, []string{
			`random (\d+)-bit values`, `(\d+) random bits`}},
		{"command of a namespace bump", "bumpGen, invalidate.go", "SET", []string{
			`(?i:namespace bump|InvalidateNamespace)[^.]{0,120}?\bone ([A-Z]{3,})\b`}},
		{"namespace generation key lifetime", "leases.genTTL, cache.go", genTTLFormula, []string{
			`(\d+ × (?:\([^)]*\)|\w+) \+ LeaseTTL)`}},
		{"SCAN batch of InvalidatePrefix", "scanBatch, invalidate.go", scanBatch, []string{`COUNT (NUM)`}},
		{"failed invalidations kept for retry", "maxRetries, retry.go", maxRetries, []string{
			`At most (NUM) are (?:queued|kept)`}},
		{"log summary interval", "summaryInterval, logs.go", summaryInterval, []string{
			`in each (DUR) interval`, `per (DUR) at Warn`}},
		{"coalesced MGETs on the wire", "maxSends, coalesce.go", maxSends, []string{`[Uu]p to (NUM) MGETs`}},
		{"reads on the wire before coalescing", "directReads, coalesce.go", directReads, []string{
			`(NUM) reads are already on the wire`}},
	}
}

// genTTLFormula is how long a namespace generation key lives, as the
// documents write it; TestDocsGenerationLifetime checks it against New.
const genTTLFormula = "2 × (TTL + stale window) + LeaseTTL"

// docForbidden are statements no document may make: the namespace bump is
// a SET of a random generation, never an INCR of a counter.
var docForbidden = []struct{ what, re, allow string }{
	{"a namespace bump described as an INCR", `(?i)\bINCR\b`,
		// ...except where a paragraph says why it is not one.
		`not an INCR|rather than counted up with INCR`},
	{"a namespace generation called a counter", `(?i)generation counter|namespace's counter`, ``},
}

var docExpand = strings.NewReplacer(
	"DUR", `\d+(?:\.\d+)?\s?(?:ns|µs|μs|ms|s|min|m|h)\b`,
	"NUM", `(?:\d{1,3}(?:,\d{3})+|\d+|one|two|three|four|five|six|seven|eight|nine|ten)`,
	"SIZE", `\d[\d,]*(?:\s?(?:MiB|KiB|bytes|B)\b)?`,
)

func TestDocsFacts(t *testing.T) {
	paras := readDocs(t)
	for _, f := range docFacts(t) {
		found := 0
		for _, src := range f.res {
			re := regexp.MustCompile(docExpand.Replace(src))
			for _, p := range paras {
				for _, m := range re.FindAllStringSubmatchIndex(p.text, -1) {
					found++
					stated := p.text[m[2]:m[3]]
					if ok, err := docValueIs(stated, f.want); !ok {
						why := ""
						if err != nil {
							why = "; " + err.Error()
						}
						t.Errorf("%s:%d: %s: the docs say %q, the code says %s (%s)%s",
							p.file, p.lineAt(m[2]), f.what, stated, docShow(f.want), f.from, why)
					}
				}
			}
		}
		if found == 0 {
			t.Errorf("%s: no statement found; a regexp of docFacts no longer matches the docs", f.what)
		}
	}
}

func TestDocsForbidden(t *testing.T) {
	paras := readDocs(t)
	for _, f := range docForbidden {
		re := regexp.MustCompile(f.re)
		for _, p := range paras {
			if f.allow != "" && regexp.MustCompile(f.allow).MatchString(p.text) {
				continue
			}
			for _, m := range re.FindAllStringIndex(p.text, -1) {
				t.Errorf("%s:%d: %s: %q", p.file, p.lineAt(m[0]), f.what, docExcerpt(p.text, m[0]))
			}
		}
	}
}

// TestDocsLocalHitFigure: every "about N ns" said of the local tier is the
// same N, and it agrees with the measured range in README.md's Figures.
func TestDocsLocalHitFigure(t *testing.T) {
	paras := readDocs(t)
	measured := regexp.MustCompile(`BenchmarkLocalHit/serial: Get answered by the local tier \| (\d+)–(\d+) ns`)
	about := regexp.MustCompile(`about (\d+) ns`)
	var lo, hi float64
	for _, p := range paras {
		if m := measured.FindStringSubmatch(p.text); m != nil {
			lo, _ = strconv.ParseFloat(m[1], 64)
			hi, _ = strconv.ParseFloat(m[2], 64)
		}
	}
	if hi == 0 {
		t.Fatal("README.md: the measured BenchmarkLocalHit/serial range is not found")
	}
	first := ""
	for _, p := range paras {
		if !strings.Contains(strings.ToLower(p.text), "local") {
			continue
		}
		for _, m := range about.FindAllStringSubmatchIndex(p.text, -1) {
			n, _ := strconv.ParseFloat(p.text[m[2]:m[3]], 64)
			where := fmt.Sprintf("%s:%d", p.file, p.lineAt(m[2]))
			if n < 0.75*lo || n > 1.25*hi {
				t.Errorf("%s: a local hit takes about %v ns, but README.md's Figures measure %v–%v ns", where, n, lo, hi)
			}
			if first == "" {
				first = where + ": about " + p.text[m[2]:m[3]] + " ns"
			} else if !strings.HasSuffix(first, ": about "+p.text[m[2]:m[3]]+" ns") {
				t.Errorf("%s: a local hit takes about %s ns, but %s", where, p.text[m[2]:m[3]], first)
			}
		}
	}
}

// TestDocsGenerationLifetime checks genTTLFormula against the lifetime New
// gives generation keys.
func TestDocsGenerationLifetime(t *testing.T) {
	docs := func(p Policy, lease time.Duration) time.Duration { // genTTLFormula
		return 2*(p.TTL+max(p.StaleWhileRevalidate, p.StaleIfError)) + lease
	}
	for _, p := range []Policy{{TTL: time.Minute}, {TTL: 2 * time.Minute, StaleWhileRevalidate: time.Minute, StaleIfError: 10 * time.Minute}} {
		c, err := New[int](&docsNoRedis{}, &Options[int]{Policy: p, LeaseTTL: 2 * time.Second, Namespaced: true,
			NoReadCoalescing: true, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if want := docs(p, 2*time.Second); c.leases.genTTL != want {
			t.Errorf("cache.go: a generation key of %+v lives %v; the docs' %q gives %v", p, c.leases.genTTL, genTTLFormula, want)
		}
	}
}

// docsNoRedis is a client New accepts and never calls.
type docsNoRedis struct{ Redis }

// docPara is one paragraph of a document, its wrapped lines joined.
type docPara struct {
	file  string
	text  string
	offs  []int // offs[i]: where line lines[i] starts in text
	lines []int
}

func (p docPara) lineAt(off int) int { return p.lines[sort.SearchInts(p.offs, off+1)-1] }

// docLine is one line of a document; join says it continues the
// paragraph of the line before.
type docLine struct {
	n    int
	text string
	join bool
}

// readDocs reads every document of the repository into paragraphs.
func readDocs(t *testing.T) []docPara {
	t.Helper()
	var paras []docPara
	err := filepath.WalkDir(".", func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := e.Name()
		if e.IsDir() {
			if path != "." && (strings.HasPrefix(name, ".") || name == "testdata" || name == "node_modules") {
				return filepath.SkipDir
			}
			return nil
		}
		var lines []docLine
		switch {
		case strings.HasSuffix(name, ".md"):
			lines = markdownLines(t, path)
		case strings.HasSuffix(name, ".go") && !strings.HasSuffix(name, "_test.go"):
			lines = goDocLines(t, path)
		default:
			return nil
		}
		for _, l := range lines {
			text := strings.Join(strings.Fields(strings.ReplaceAll(l.text, "`", "")), " ")
			if text == "" {
				continue
			}
			if !l.join || len(paras) == 0 || paras[len(paras)-1].file != path {
				paras = append(paras, docPara{file: path})
			}
			p := &paras[len(paras)-1]
			if p.text != "" {
				p.text += " "
			}
			p.offs, p.lines = append(p.offs, len(p.text)), append(p.lines, l.n)
			p.text += text
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return paras
}

var docListItem = regexp.MustCompile(`^(?:[-*] |\d+\. )`)

// markdownLines: prose lines join the line before unless they start a
// list item; table rows, headings and fenced code stand alone.
func markdownLines(t *testing.T, path string) []docLine {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []docLine
	fence, prose := false, false
	for i, l := range strings.Split(string(b), "\n") {
		s := strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(s, "```"):
			fence, prose = !fence, false
		case fence || s == "" || strings.HasPrefix(s, "|") || strings.HasPrefix(s, "#"):
			out = append(out, docLine{n: i + 1, text: s})
			prose = false
		default:
			out = append(out, docLine{n: i + 1, text: s, join: prose && !docListItem.MatchString(s)})
			prose = true
		}
	}
	return out
}

// goDocLines returns the comments and string literals of a Go file.
// Consecutive comment lines of prose join; code in comments (indented by
// a tab) and each line of a string stand alone.
func goDocLines(t *testing.T, path string) []docLine {
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	var s goscanner.Scanner
	s.Init(fset.AddFile(path, -1, len(src)), src, nil, goscanner.ScanComments)
	var out []docLine
	prev := -1 // line of the last prose comment line
	for {
		pos, tok, lit := s.Scan()
		if tok == token.EOF {
			return out
		}
		n := fset.Position(pos).Line
		switch tok {
		case token.COMMENT:
			for i, l := range strings.Split(strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(lit, "//"), "/*"), "*/"), "\n") {
				l = strings.TrimPrefix(l, " ")
				switch {
				case strings.TrimSpace(l) == "":
					prev = -1
				case strings.HasPrefix(l, "\t"):
					out = append(out, docLine{n: n + i, text: l})
					prev = -1
				default:
					s := strings.TrimSpace(l)
					out = append(out, docLine{n: n + i, text: s, join: prev == n+i-1 && !docListItem.MatchString(s)})
					prev = n + i
				}
			}
		case token.STRING:
			v, err := strconv.Unquote(lit)
			if err != nil {
				continue
			}
			raw := strings.HasPrefix(lit, "`")
			for i, l := range strings.Split(v, "\n") {
				if raw {
					out = append(out, docLine{n: n + i, text: l})
				} else {
					out = append(out, docLine{n: n, text: l})
				}
			}
		}
	}
}

// docValueIs reports whether the stated value is want, and why not.
func docValueIs(stated string, want any) (bool, error) {
	switch w := want.(type) {
	case time.Duration:
		d, err := docDuration(stated)
		return err == nil && d == w, err
	case int:
		n, err := docNumber(stated)
		return err == nil && n == w, err
	case float64:
		f, err := strconv.ParseFloat(stated, 64)
		return err == nil && f == w, err
	case string:
		return strings.Join(strings.Fields(stated), " ") == w, nil
	case oneOf:
		for _, s := range w {
			if stated == s {
				return true, nil
			}
		}
		return false, nil
	}
	panic(fmt.Sprintf("docs_test: want of type %T", want))
}

func docShow(want any) string {
	switch w := want.(type) {
	case oneOf:
		return strings.Join(w, " or ")
	case string:
		return strconv.Quote(w)
	}
	return fmt.Sprint(want)
}

func docDuration(s string) (time.Duration, error) {
	s = strings.ReplaceAll(s, " ", "")
	switch {
	case s == "second":
		return time.Second, nil
	case strings.Trim(s, "0123456789") == "": // a Redis argument: milliseconds
		n, err := strconv.Atoi(s)
		return time.Duration(n) * time.Millisecond, err
	case strings.HasSuffix(s, "min"):
		s = strings.TrimSuffix(s, "in")
	}
	return time.ParseDuration(s)
}

var docWords = map[string]int{"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}

func docNumber(s string) (int, error) {
	if n, ok := docWords[s]; ok {
		return n, nil
	}
	unit := 1
	for _, u := range []struct {
		suffix string
		n      int
	}{{"MiB", 1 << 20}, {"KiB", 1 << 10}, {"bytes", 1}, {"B", 1}} {
		if strings.HasSuffix(s, u.suffix) {
			s, unit = strings.TrimSuffix(s, u.suffix), u.n
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.ReplaceAll(s, ",", "")))
	return n * unit, err
}

func docExcerpt(s string, at int) string {
	from, to := max(0, at-40), min(len(s), at+60)
	if i := strings.IndexByte(s[from:at], ' '); from > 0 && i >= 0 {
		from += i + 1
	}
	if i := strings.LastIndexByte(s[at:to], ' '); to < len(s) && i > 0 {
		to = at + i
	}
	return s[from:to]
}
