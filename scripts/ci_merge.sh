#!/usr/bin/env bash
# Run every merge recipe of a folder with `merge run`, then publish or check each output.
#
# Usage: scripts/ci_merge.sh RECIPES_DIR OUTPUT_DIR
#
# Each RECIPES_DIR/NAME.yaml (or .yml) is merged into OUTPUT_DIR/NAME. Model paths in
# the recipes resolve from the current working folder.
#
# Environment:
#   HF_TOKEN         Hub access token. When it is set (and not empty), every output is
#                    pushed to ${HUB_REPO_PREFIX}NAME. When it is unset or empty, every
#                    output is checked with `merge push --dry-run`, which lists the files
#                    a push would send. The script never prints the token.
#   HUB_REPO_PREFIX  Repo id prefix, "ORG/" or "ORG/PREFIX-"; required when HF_TOKEN is set.
#   HUB_REVISION     Branch to push to (default: main).
#   HUB_PRIVATE      "1" or "true": create new repos as private.
#
# Exit status: 0 on success (also when the folder contains no recipe), 1 when a merge or a
# push fails, 2 on a usage error, 127 when the `merge` command is not on PATH.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 RECIPES_DIR OUTPUT_DIR" >&2
    exit 2
fi
recipes_dir=$1
output_dir=$2

if ! command -v merge >/dev/null 2>&1; then
    echo "error: the 'merge' command is not on PATH; install mergekit-ext first (pip install mergekit-ext)" >&2
    exit 127
fi
if [[ ! -d $recipes_dir ]]; then
    echo "error: recipe folder '$recipes_dir' not found" >&2
    exit 2
fi

push=0
if [[ -n ${HF_TOKEN:-} ]]; then
    if [[ -z ${HUB_REPO_PREFIX:-} ]]; then
        echo "error: HF_TOKEN is set but HUB_REPO_PREFIX is not; set it to ORG/ or ORG/PREFIX- to name the repos" >&2
        exit 2
    fi
    push=1
fi
prefix=${HUB_REPO_PREFIX:-local/}
revision=${HUB_REVISION:-main}
private_flag=()
case ${HUB_PRIVATE:-} in
    1 | true | TRUE | yes) private_flag=(--private) ;;
esac

shopt -s nullglob
recipes=("$recipes_dir"/*.yaml "$recipes_dir"/*.yml)
shopt -u nullglob
if [[ ${#recipes[@]} -eq 0 ]]; then
    echo "no recipes (*.yaml, *.yml) in '$recipes_dir'; nothing to merge"
    exit 0
fi
mapfile -t recipes < <(printf '%s\n' "${recipes[@]}" | LC_ALL=C sort)

mkdir -p "$output_dir"
names=()
for recipe in "${recipes[@]}"; do
    file_name=$(basename "$recipe")
    name=${file_name%.*}
    if [[ ! $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
        echo "error: recipe file name '$file_name' cannot name a repo; use letters, digits, '.', '_' and '-'" >&2
        exit 2
    fi
    echo "==> merge run $recipe --output $output_dir/$name"
    if ! merge run "$recipe" --output "$output_dir/$name" --force; then
        echo "::error::merge of recipe '$recipe' failed" >&2
        exit 1
    fi
    names+=("$name")
done

message_suffix=""
if [[ -n ${GITHUB_SHA:-} ]]; then
    message_suffix=" at ${GITHUB_SHA}"
fi
for name in "${names[@]}"; do
    repo_id="${prefix}${name}"
    if [[ $push -eq 1 ]]; then
        echo "==> merge push $output_dir/$name --repo-id $repo_id --revision $revision"
        if ! merge push "$output_dir/$name" --repo-id "$repo_id" --revision "$revision" "${private_flag[@]}" \
            --commit-message "CI merge of ${name}${message_suffix}"; then
            echo "::error::push of '$output_dir/$name' to $repo_id failed" >&2
            exit 1
        fi
    else
        echo "==> HF_TOKEN not set: checking $output_dir/$name with merge push --dry-run"
        if ! merge push "$output_dir/$name" --repo-id "$repo_id" --revision "$revision" --dry-run; then
            echo "::error::'$output_dir/$name' cannot be published" >&2
            exit 1
        fi
    fi
done
echo "merged ${#names[@]} recipes into $output_dir"
