package cacheaside

import (
	"bufio"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// The release procedure (RELEASING.md) rests on three things this test
// checks without a network:
//
//   - CHANGELOG.md's first section heading names the version of the next
//     release: "## [Unreleased] — next release: vX.Y.Z" between releases, or
//     "## [vX.Y.Z] — YYYY-MM-DD" on the commit being tagged vX.Y.Z;
//   - every go.mod under extra/ and examples/ requires each module of this
//     repository at exactly that version, and replaces it with its directory
//     in the repository (a replace in a dependency's go.mod is ignored by its
//     dependents, so the require must name the version about to be tagged);
//   - the root go.mod has no replace directive, which would make
//     `go install .../cmd/cacheaside@vX.Y.Z` fail.

var nextReleaseRE = regexp.MustCompile(`^## \[(?:Unreleased\] — next release: (v[0-9]+\.[0-9]+\.[0-9]+)|(v[0-9]+\.[0-9]+\.[0-9]+)\] — [0-9]{4}-[0-9]{2}-[0-9]{2})\s*$`)

// nextRelease returns the version named by CHANGELOG.md's first section
// heading.
func nextRelease(t *testing.T) string {
	t.Helper()
	f, err := os.Open("CHANGELOG.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if !strings.HasPrefix(line, "## ") {
			continue
		}
		m := nextReleaseRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("CHANGELOG.md:%d: the first section heading is %q; want \"## [Unreleased] — next release: vX.Y.Z\" (or \"## [vX.Y.Z] — YYYY-MM-DD\" on a release commit)", n, line)
		}
		return m[1] + m[2]
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	t.Fatal(`CHANGELOG.md: no section heading; want "## [Unreleased] — next release: vX.Y.Z"`)
	return ""
}

// modLine is one requirement or replacement read from a go.mod file.
type modLine struct {
	line    int
	path    string
	version string // of the require, or of the left side of the replace ("" for all versions)
	target  string // replace only: the right side's path
}

type goMod struct {
	module   string
	requires []modLine
	replaces []modLine
}

// parseGoMod reads the module, require and replace directives of a go.mod
// file, in their single-line and block forms.
func parseGoMod(t *testing.T, name string) goMod {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	var gm goMod
	block := ""
	for i, raw := range strings.Split(string(data), "\n") {
		n := i + 1
		line := raw
		if j := strings.Index(line, "//"); j >= 0 {
			line = line[:j]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if block != "" {
			if f[0] == ")" {
				block = ""
				continue
			}
			f = append([]string{block}, f...)
		} else if len(f) == 2 && f[1] == "(" {
			block = f[0]
			continue
		}
		for k := range f {
			if strings.HasPrefix(f[k], `"`) {
				if u, err := strconv.Unquote(f[k]); err == nil {
					f[k] = u
				}
			}
		}
		switch f[0] {
		case "module":
			if len(f) == 2 {
				gm.module = f[1]
			}
		case "require":
			if len(f) != 3 {
				t.Fatalf("%s:%d: cannot read require %q", name, n, raw)
			}
			gm.requires = append(gm.requires, modLine{line: n, path: f[1], version: f[2]})
		case "replace":
			arrow := -1
			for k, s := range f {
				if s == "=>" {
					arrow = k
				}
			}
			if (arrow != 2 && arrow != 3) || arrow+1 >= len(f) {
				t.Fatalf("%s:%d: cannot read replace %q", name, n, raw)
			}
			r := modLine{line: n, path: f[1], target: f[arrow+1]}
			if arrow == 3 {
				r.version = f[2]
			}
			gm.replaces = append(gm.replaces, r)
		}
	}
	return gm
}

func TestReleaseVersionsAgree(t *testing.T) {
	next := nextRelease(t)
	root := parseGoMod(t, "go.mod")
	if root.module == "" {
		t.Fatal("go.mod: no module directive")
	}
	for _, r := range root.replaces {
		t.Errorf("go.mod:%d: replace %s => %s: the root module must have no replace directive, or `go install %s/cmd/cacheaside@%s` fails",
			r.line, r.path, r.target, root.module, next)
	}

	var mods []string
	for _, dir := range []string{"extra", "examples"} {
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) {
				return filepath.SkipDir
			}
			if !d.IsDir() && d.Name() == "go.mod" {
				mods = append(mods, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(mods) == 0 {
		t.Fatal("no go.mod under extra/ or examples/")
	}

	repoRoot, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range mods {
		gm := parseGoMod(t, name)
		for _, req := range gm.requires {
			rel, ok := strings.CutPrefix(req.path, root.module)
			if !ok || (rel != "" && !strings.HasPrefix(rel, "/")) {
				continue // not a module of this repository
			}
			if req.version != next {
				t.Errorf("%s:%d: requires %s %s, but CHANGELOG.md names %s as the next release; make them agree (RELEASING.md)",
					name, req.line, req.path, req.version, next)
			}
			want := filepath.Join(repoRoot, filepath.FromSlash(strings.TrimPrefix(rel, "/")))
			var rep *modLine
			for i := range gm.replaces {
				if gm.replaces[i].path == req.path {
					rep = &gm.replaces[i]
				}
			}
			switch {
			case rep == nil:
				t.Errorf("%s:%d: requires %s %s but has no replace directive for it; add `replace %s => %s` so the module builds from this repository before %s is tagged",
					name, req.line, req.path, req.version, req.path, relTo(t, filepath.Dir(name), want), req.version)
			case rep.version != "":
				t.Errorf("%s:%d: replace %s %s => %s covers %s only; drop the version so it covers every version, %s included",
					name, rep.line, rep.path, rep.version, rep.target, rep.version, req.version)
			case filepath.IsAbs(rep.target) || filepath.Join(repoRoot, filepath.Dir(name), rep.target) != want:
				t.Errorf("%s:%d: replace %s => %s does not point at the module's directory in this repository; want %s",
					name, rep.line, rep.path, rep.target, relTo(t, filepath.Dir(name), want))
			}
		}
	}
}

func relTo(t *testing.T, base, target string) string {
	t.Helper()
	abs, err := filepath.Abs(base)
	if err != nil {
		t.Fatal(err)
	}
	r, err := filepath.Rel(abs, target)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.ToSlash(r)
}
