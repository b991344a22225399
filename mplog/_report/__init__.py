"""``python -m mplog report``: one self-contained HTML page of what a run did, from its full log.

reader  streams the full log and its rotated copies into blocks (a header and its lines);
summary folds the blocks into bounded aggregates (time bins, processes, groups, deaths);
page    writes those aggregates as one HTML file (inline CSS, SVG and JS; nothing fetched).
"""
