"""`rex completion bash|zsh`: shell completion scripts generated from the argparse parsers.

The scripts hold no hand-written list of commands or options: every subcommand, option and
positional argument comes from walking ``rex``'s and ``rex_key``'s parsers when the script is
printed. What an option's value is (a manifest, a file, hosts...) is read from its dest and
metavar. Host, group and program names come from ``rex completion --names KIND MANIFEST``,
which only parses the manifest: no host is contacted, and on any error it prints nothing.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rexplan import __version__
from rexplan.errors import RexError, UsageError

if TYPE_CHECKING:
    from rexplan.cli import ui

SHELLS = ("bash", "zsh")
NAME_KINDS = ("hosts", "groups", "programs", "tags", "limit")

#: what a value is, by metavar; a value not listed here is free text
_METAVAR_KINDS = {
    "MANIFEST": "manifest",
    "FILE": "file",
    "INVENTORY": "file",
    "DIR": "dir",
    "HOST": "hosts",
}
#: by dest, for options whose metavar says little (``--limit PATTERN``, ``--program P``)
_DEST_KINDS = {"limit": "limit", "program": "programs", "steps": "programs", "tags": "tags"}
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.:+/@%=-]+\Z")


@dataclass(frozen=True)
class Option:
    """One option: its spellings, help, and the kind of each value it takes (none: a flag)."""

    names: tuple[str, ...]
    help: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    """A command or subcommand: ``path`` such as ("rex", "hostkeys", "scan")."""

    path: tuple[str, ...]
    commands: tuple[tuple[str, str], ...]
    options: tuple[Option, ...]
    positionals: tuple[str, ...]  # a kind per argument; a trailing "..." repeats the last


def _help(action: argparse.Action) -> str:
    text = action.help if isinstance(action.help, str) else ""
    return " ".join(text.replace("%%", "%").split())


def _kind(action: argparse.Action, metavar: str | None) -> str:
    if action.choices is not None:
        choices = [str(c) for c in action.choices]
        if all(_SAFE_WORD.match(c) and "," not in c for c in choices):
            return "choices:" + ",".join(choices)
        return "text"
    if action.dest in _DEST_KINDS:
        return _DEST_KINDS[action.dest]
    return _METAVAR_KINDS.get(metavar or action.dest.upper(), "text")


def _value_kinds(action: argparse.Action) -> tuple[str, ...]:
    nargs = action.nargs
    if nargs == 0:
        return ()
    count = nargs if isinstance(nargs, int) else 1
    metavar = action.metavar
    metavars = metavar if isinstance(metavar, tuple) else (metavar,) * count
    return tuple(_kind(action, metavars[i] if i < len(metavars) else None) for i in range(count))


def walk(parser: argparse.ArgumentParser, prog: str) -> Iterator[Command]:
    """Every command of ``parser`` and its subparsers, depth first, parents before children."""
    yield from _walk(parser, (prog,))


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[Command]:
    options: list[Option] = []
    positionals: list[str] = []
    subcommands: list[tuple[str, str]] = []
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _help(a) for a in action._choices_actions}
            for name, sub in action.choices.items():
                subcommands.append((name, helps.get(name, "")))
                children.append((name, sub))
        elif action.option_strings:
            options.append(
                Option(tuple(action.option_strings), _help(action), _value_kinds(action))
            )
        else:
            kinds = list(_value_kinds(action)) or ["text"]
            if action.nargs in ("*", "+"):
                kinds[-1] += "..."
            positionals.extend(kinds)
    yield Command(path, tuple(subcommands), tuple(options), tuple(positionals))
    for name, sub in children:
        yield from _walk(sub, (*path, name))


def _q(text: str) -> str:
    """``text`` in single quotes for sh, bash and zsh alike."""
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_item(name: str, text: str) -> str:
    return _q(name.replace(":", "\\:") + (f":{text}" if text else ""))


def _spec_bash(commands: Sequence[Command]) -> str:
    lines = ["_rex_spec() {", "    cmds= opts= pos=", "    case $1 in"]
    for c in commands:
        opts = " ".join(n for o in c.options for n in o.names)
        lines.append(
            f"        {_q(' '.join(c.path))}) cmds={_q(' '.join(n for n, _ in c.commands))}"
            f" opts={_q(opts)} pos={_q(' '.join(c.positionals))} ;;"
        )
    lines += ["    esac", "}"]
    return "\n".join(lines)


def _spec_zsh(commands: Sequence[Command]) -> str:
    lines = ["_rex_spec() {", "    cmds=() opts=() pos=()", "    case $1 in"]
    for c in commands:
        cmds = " ".join(_zsh_item(n, t) for n, t in c.commands)
        opts = " ".join(_zsh_item(n, o.help) for o in c.options for n in o.names)
        pos = " ".join(_q(p) for p in c.positionals)
        lines.append(f"        ({_q(' '.join(c.path))}) cmds=({cmds}) opts=({opts}) pos=({pos}) ;;")
    lines += ["    esac", "}"]
    return "\n".join(lines)


def _optval(commands: Sequence[Command]) -> str:
    """``_rex_optval 'PATH OPTION'`` prints the kinds of the option's values (case syntax of
    bash and zsh alike)."""
    lines = ["_rex_optval() {", "    case $1 in"]
    for c in commands:
        for o in c.options:
            if o.values:
                pattern = "|".join(_q(" ".join((*c.path, n))) for n in o.names)
                lines.append(f"        ({pattern}) echo {' '.join(o.values)} ;;")
    lines += ["    esac", "}"]
    return "\n".join(lines)


_BASH = r"""
# The manifest named on the line: -m/--manifest FILE, else the first *.yaml/*.yml file.
_rex_manifest() {
    local i w
    for ((i = 1; i < ${#words[@]}; i++)); do
        ((i == cword)) && continue
        w=${words[i]}
        case $w in
            -m | --manifest)
                ((i + 1 == cword)) && return 1
                printf '%s' "${words[i + 1]/#\~/$HOME}"
                return
                ;;
            --manifest=*) printf '%s' "${w#--manifest=}" && return ;;
        esac
    done
    for ((i = 1; i < ${#words[@]}; i++)); do
        ((i == cword)) && continue
        w=${words[i]/#\~/$HOME}
        case $w in
            *.yaml | *.yml) [[ -f $w ]] && printf '%s' "$w" && return ;;
        esac
    done
    return 1
}

_rex_names() {
    local manifest
    manifest=$(_rex_manifest) || return
    "${words[0]%_key}" completion --names "$1" "$manifest" 2>/dev/null
}

# COMPREPLY for a value of kind $1 (see rexplan/cli/completion.py), the word being $2
_rex_values() {
    local kind=$1 cur=$2 f head= last
    case $kind in
        manifest)
            compopt -o filenames 2>/dev/null
            while IFS= read -r f; do
                if [[ -d $f || $f == *.yaml || $f == *.yml ]]; then COMPREPLY+=("$f"); fi
            done < <(compgen -f -- "$cur")
            ;;
        file)
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$cur"))
            ;;
        dir)
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -d -- "$cur"))
            ;;
        hosts | groups | programs | tags)
            COMPREPLY=($(compgen -W "$(_rex_names "$kind")" -- "$cur"))
            ;;
        limit)
            last=$cur
            if [[ $cur == *,* ]]; then head=${cur%,*}, last=${cur##*,}; fi
            f=$(_rex_names limit)
            COMPREPLY=($(compgen -P "$head" -W "$f" -- "$last"))
            ;;
        choices:*)
            f=${kind#choices:}
            COMPREPLY=($(compgen -W "${f//,/ }" -- "$cur"))
            ;;
    esac
}

_rex() {
    local words=() cword=0 i w cmds opts pos cmdpath kinds=() skip=0 npos=0 kind
    COMPREPLY=()
    # put back together the words bash split at ':' and '=' (COMP_WORDBREAKS)
    for ((i = 0; i < ${#COMP_WORDS[@]}; i++)); do
        w=${COMP_WORDS[i]}
        if ((${#words[@]} > 1)) && [[ $w == [:=]* || ${words[${#words[@]} - 1]} == *[:=] ]]; then
            words[${#words[@]} - 1]+=$w
        else
            words+=("$w")
        fi
        ((i == COMP_CWORD)) && cword=$((${#words[@]} - 1))
    done
    local cur=${words[cword]} frag=${COMP_WORDS[COMP_CWORD]}
    local strip=${cur%"$frag"}
    if [[ ${words[0]##*/} == rex_key ]]; then cmdpath=rex_key; else cmdpath=rex; fi
    _rex_spec "$cmdpath"
    for ((i = 1; i < cword; i++)); do
        w=${words[i]}
        if ((skip > 0)); then
            skip=$((skip - 1))
            continue
        fi
        case $w in
            -- | --*=*) ;;
            -*)
                kinds=($(_rex_optval "$cmdpath $w"))
                skip=${#kinds[@]}
                ;;
            *)
                if [[ " $cmds " == *" $w "* ]]; then
                    cmdpath+=" $w"
                    _rex_spec "$cmdpath"
                    npos=0
                else
                    npos=$((npos + 1))
                fi
                ;;
        esac
    done
    if ((skip > 0)); then
        _rex_values "${kinds[${#kinds[@]} - skip]}" "$cur"
    elif [[ $cur == --*=* ]]; then
        kinds=($(_rex_optval "$cmdpath ${cur%%=*}"))
        _rex_values "${kinds[0]}" "${cur#*=}"
        COMPREPLY=("${COMPREPLY[@]/#/${cur%%=*}=}")
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ -n $cmds ]]; then
        COMPREPLY=($(compgen -W "$cmds" -- "$cur"))
    else
        pos=($pos)
        if ((npos < ${#pos[@]})); then
            kind=${pos[npos]}
        elif ((${#pos[@]})) && [[ ${pos[${#pos[@]} - 1]} == *... ]]; then
            kind=${pos[${#pos[@]} - 1]}
        fi
        [[ -n $kind ]] && _rex_values "${kind%...}" "$cur"
    fi
    if [[ -n $strip ]]; then
        COMPREPLY=("${COMPREPLY[@]#"$strip"}")
    fi
    return 0
}

complete -F _rex rex rex_key
"""


_ZSH = r"""
# The manifest named on the line: -m/--manifest FILE, else the first *.yaml/*.yml file.
_rex_manifest() {
    local -i i
    local w
    for (( i = 2; i <= $#words; i++ )); do
        (( i == CURRENT )) && continue
        w=${words[i]}
        case $w in
            (-m|--manifest)
                (( i + 1 == CURRENT )) && return 1
                print -r -- ${words[i+1]/#\~/$HOME}
                return ;;
            (--manifest=*) print -r -- ${${w#--manifest=}/#\~/$HOME} && return ;;
        esac
    done
    for (( i = 2; i <= $#words; i++ )); do
        (( i == CURRENT )) && continue
        w=${words[i]/#\~/$HOME}
        case $w in
            (*.yaml|*.yml) [[ -f $w ]] && print -r -- $w && return ;;
        esac
    done
    return 1
}

_rex_names() {
    local manifest
    manifest=$(_rex_manifest) || return
    ${words[1]%_key} completion --names $1 $manifest 2>/dev/null
}

_rex_values() {
    local kind=$1
    local -a names
    case $kind in
        (manifest) _files -g '*.(yaml|yml)' ;;
        (file) _files ;;
        (dir) _files -/ ;;
        (hosts|groups|programs|tags)
            names=(${(f)"$(_rex_names $kind)"})
            compadd -- $names ;;
        (limit)
            compset -P '*,'
            names=(${(f)"$(_rex_names limit)"})
            compadd -- $names ;;
        (choices:*)
            compadd -- ${(s:,:)kind#choices:} ;;
    esac
}

_rex() {
    local -a cmds opts pos kinds
    local cmdpath w kind cur
    local -i i skip=0 npos=0
    if [[ ${words[1]:t} == rex_key ]]; then cmdpath=rex_key; else cmdpath=rex; fi
    _rex_spec $cmdpath
    for (( i = 2; i < CURRENT; i++ )); do
        w=${words[i]}
        if (( skip > 0 )); then
            (( skip-- ))
            continue
        fi
        case $w in
            (--|--*=*) ;;
            (-*)
                kinds=(${=$(_rex_optval "$cmdpath $w")})
                skip=${#kinds} ;;
            (*)
                if (( ${cmds[(I)${(b)w}(|:*)]} )); then
                    cmdpath+=" $w"
                    _rex_spec $cmdpath
                    npos=0
                else
                    (( npos++ ))
                fi ;;
        esac
    done
    cur=${words[CURRENT]}
    if (( skip > 0 )); then
        _rex_values ${kinds[$#kinds - skip + 1]}
    elif [[ $cur == --*=* ]]; then
        kinds=(${=$(_rex_optval "$cmdpath ${cur%%=*}")})
        compset -P '*='
        (( $#kinds )) && _rex_values ${kinds[1]}
    elif [[ $cur == -* ]]; then
        _describe -t options option opts
    elif (( $#cmds )); then
        _describe -t commands command cmds
    else
        if (( npos < $#pos )); then
            kind=${pos[npos + 1]}
        elif (( $#pos )) && [[ ${pos[-1]} == *... ]]; then
            kind=${pos[-1]}
        fi
        [[ -n $kind ]] && _rex_values ${kind%...}
    fi
    return 0
}

if [[ ${funcstack[1]} == _rex ]]; then
    _rex "$@"
else
    compdef _rex rex rex_key
fi
"""


def _header(shell: str, comment: str) -> str:
    return (
        f"{comment}\n"
        f"# {shell} completion for rex and rex_key, generated by 'rex completion {shell}' "
        f"(rex {__version__}).\n"
        "# Regenerate it after upgrading rex; host, group and program names come from\n"
        "# 'rex completion --names KIND MANIFEST', which never contacts a host.\n"
    )


def script(shell: str, parsers: Sequence[tuple[str, argparse.ArgumentParser]]) -> str:
    """The completion script for ``shell`` (bash or zsh), from ``parsers`` (command, parser)."""
    if shell not in SHELLS:
        raise UsageError(f"no completion for {shell!r}", hint=f"shells: {', '.join(SHELLS)}")
    commands = [c for prog, parser in parsers for c in walk(parser, prog)]
    if shell == "bash":
        head = _header(shell, '# bash: eval "$(rex completion bash)" in ~/.bashrc')
        return "\n".join([head, _spec_bash(commands), _optval(commands), _BASH.lstrip("\n")])
    head = _header(shell, "#compdef rex rex_key")
    return "\n".join([head, _spec_zsh(commands), _optval(commands), _ZSH.lstrip("\n")])


def names(kind: str, path: str) -> list[str]:
    """Host, group, program names or tags of the manifest at ``path``, in manifest order; ``limit``:
    the hosts, then ``group:NAME`` for each group (what ``--limit`` takes).

    Only parses and validates the manifest; raises ManifestError like ``rex validate``.
    """
    from rexplan.core import manifest

    loaded = manifest.load(path)
    if kind == "hosts":
        return [h.name for h in loaded.hosts]
    if kind == "programs":
        return [p.name for p in loaded.programs]
    if kind == "tags":
        return list(dict.fromkeys(t for p in loaded.programs for t in p.tags))
    groups = list(dict.fromkeys(g for h in loaded.hosts for g in h.groups))
    if kind == "groups":
        return groups
    return [h.name for h in loaded.hosts] + [f"group:{g}" for g in groups]


def cmd_completion(args: argparse.Namespace, screen: ui.Screen) -> int:
    """``rex completion bash|zsh`` prints a script; ``--names KIND MANIFEST`` prints names."""
    if args.names is not None:
        kind, path = args.names
        if kind not in NAME_KINDS:
            raise UsageError(f"--names {kind!r}: not one of {', '.join(NAME_KINDS)}")
        try:
            found = names(kind, path)
        except RexError as e:
            # called by the shell at every TAB: a broken manifest completes nothing, quietly
            return e.exit_code
        if found:
            screen.text("\n".join(found))
        return 0
    if args.shell is None:
        raise UsageError("name a shell: rex completion bash, or rex completion zsh")
    screen.text(script(args.shell, args.completion_parsers()))
    return 0
